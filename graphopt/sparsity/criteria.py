"""Pruning criteria: which weights to zero (magnitude, Wanda, SparseGPT) and what it costs.

Both forms of the `nm_sparsity` pass call `prune`, so FX and ONNX prune identically; weights are
in the canonical [out, in] layout of `graphopt.sparsity.patterns`.
"""

from __future__ import annotations

import numpy as np

from graphopt.errors import UnsupportedGraphError
from graphopt.sparsity import obs_sweep
from graphopt.sparsity.patterns import Pattern, nm_mask, unstructured_mask

__all__ = ["magnitude_scores", "wanda_scores", "global_threshold", "sparsegpt", "prune", "reconstruction_error"]


def magnitude_scores(w: np.ndarray) -> np.ndarray:
    return np.abs(w)


def wanda_scores(w: np.ndarray, input_norm: np.ndarray) -> np.ndarray:
    """|W_ij| · ‖X_j‖ (Wanda), `input_norm` the L2 norm of each input channel over calibration rows."""
    return np.abs(w) * np.asarray(input_norm, dtype=np.float64)[None, :]


def global_threshold(all_scores: list[np.ndarray], ratio: float) -> float:
    """The score under which `ratio` of all weights of all layers fall (global unstructured)."""
    flat = np.concatenate([s.ravel() for s in all_scores])
    k = int(flat.size * ratio)
    if k == 0:
        return -np.inf
    return float(np.partition(flat, k - 1)[k - 1])


# ---------------------------------------------------------------------------- SparseGPT
def sparsegpt(w: np.ndarray, hessian: np.ndarray, pattern: Pattern, *, blocksize: int = 128,
              dampening: float = 0.01, scope: str = "layer") -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT (Frantar & Alistarh 2023): prune `w` [out, in] to `pattern` given H = 2/n·XᵀX.

    The OBS column sweep of `graphopt.sparsity.obs_sweep` with pruning as the replacement: N:M groups are chosen
    per group of M columns as the sweep reaches them, unstructured masks per block of `blocksize`
    columns (over the block: 'layer'; per row: 'row'), by w²/[H⁻¹]ⱼⱼ²; the pruned entries' error
    moves to the kept ones. H gets `dampening`·mean(diag H) on its diagonal. Returns (pruned
    weight as float32, keep mask).
    """
    import torch

    cols = w.shape[1]
    if pattern.structured and cols % pattern.m:
        raise UnsupportedGraphError(f"N:M {pattern.label}: input dim {cols} is not a multiple of {pattern.m}")
    W, hinv = obs_sweep.prepare(w, hessian, dampening, "SparseGPT")
    if pattern.structured:  # whole groups inside a block
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    d = torch.diag(hinv)
    keep = torch.ones(W.shape, dtype=torch.bool)
    prune_count = pattern.m - pattern.n

    def replace(j: int, block, i: int):
        block = block.T  # [out, columns of the block]
        if i == 0 and not pattern.structured and pattern.ratio > 0:
            span = slice(j, j + block.shape[1])
            keep[:, span] = ~_unstructured_drop(block ** 2 / d[None, span] ** 2, pattern.ratio, scope)
        if pattern.structured and prune_count and j % pattern.m == 0:
            score = block[:, i:i + pattern.m] ** 2 / d[None, j:j + pattern.m] ** 2
            weakest = torch.topk(score, prune_count, dim=1, largest=False)[1]
            keep[:, j:j + pattern.m].scatter_(1, weakest, False)
        return torch.where(keep[:, j], block[:, i], torch.zeros_like(block[:, i]))

    W = obs_sweep.sweep(W, hinv, replace, blocksize)
    W[~keep] = 0.0
    return W.numpy(), keep.numpy()


def _unstructured_drop(score, ratio: float, scope: str):
    import torch

    if scope == "row":
        k = int(score.shape[1] * ratio)
        drop = torch.zeros_like(score, dtype=torch.bool)
        if k:
            drop.scatter_(1, torch.topk(score, k, dim=1, largest=False)[1], True)
        return drop
    k = int(score.numel() * ratio)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = torch.kthvalue(score.flatten(), k).values
    return score <= threshold


# -------------------------------------------------------------------------- one weight
def prune(w: np.ndarray, pattern: Pattern, method: str, *, hessian: np.ndarray | None = None,
          scope: str = "row", threshold: float | None = None, blocksize: int = 128,
          dampening: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Prune one [out, in] weight; returns (new weight float32, keep mask).

    method 'magnitude' needs nothing; 'wanda' and 'sparsegpt' need the input Hessian (Wanda uses
    its diagonal: ‖X_j‖² = n/2·H_jj, the same numbers a ChannelSquareSum gives). `threshold`
    (global unstructured) drops every score at or below it instead of a per-layer ratio.
    """
    if method in ("wanda", "sparsegpt") and hessian is None:
        raise UnsupportedGraphError(f"{method} needs calibration activations (an input Hessian)")
    if not pattern.structured and pattern.ratio == 0 and threshold is None:
        return np.asarray(w, dtype=np.float32), np.ones(w.shape, dtype=bool)
    if method == "sparsegpt":
        return sparsegpt(w, hessian, pattern, blocksize=blocksize, dampening=dampening, scope=scope)
    scores = magnitude_scores(w) if method == "magnitude" else wanda_scores(w, np.sqrt(np.diag(hessian)))
    if threshold is not None:
        keep = scores > threshold
    elif pattern.structured:
        keep = nm_mask(scores, pattern.n, pattern.m)
    else:
        keep = unstructured_mask(scores, pattern.ratio, scope)
    return np.where(keep, w, 0).astype(np.float32), keep


def reconstruction_error(w: np.ndarray, w_new: np.ndarray, hessian: np.ndarray) -> float:
    """‖XW − XŴ‖ / ‖XW‖ over the calibration rows, from H ∝ XᵀX (weights [out, in])."""
    import torch

    H = torch.tensor(hessian, dtype=torch.float64)
    W = torch.tensor(w, dtype=torch.float64)
    D = W - torch.tensor(w_new, dtype=torch.float64)
    num = torch.einsum("oi,ij,oj->", D, H, D).item()
    den = torch.einsum("oi,ij,oj->", W, H, W).item()
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
