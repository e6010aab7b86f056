"""Sparsity numerics: N:M and unstructured masks, magnitude / Wanda / SparseGPT, pattern checks.

Every function works on a weight in the canonical [out, in] layout (torch Linear); callers move
ONNX MatMul weights ([in, out]) with `to_canonical` / `from_canonical`. N:M groups are M
consecutive weights along the INPUT dimension (what sparse tensor cores and NPUs skip).
Both forms of the `nm_sparsity` pass use these, so FX and ONNX prune identically.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import numpy as np

from graphopt import obs
from graphopt.errors import OptionError, UnsupportedGraphError

__all__ = [
    "Pattern", "parse_pattern", "to_canonical", "from_canonical", "magnitude_scores", "wanda_scores",
    "nm_mask", "unstructured_mask", "global_threshold", "sparsegpt", "prune", "check_pattern",
    "is_n_m", "sparsity_of", "reconstruction_error", "name_matches",
]


@dataclass(frozen=True)
class Pattern:
    """Either N:M (`n` kept of every `m` along the input dim) or unstructured with `ratio` zeros."""

    n: int = 0
    m: int = 0
    ratio: float = 0.0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    @property
    def target(self) -> float:
        """The fraction of zeros this pattern asks for."""
        return 1.0 - self.n / self.m if self.structured else self.ratio


def parse_pattern(text: str | float, ratio: float = 0.5, *, option: str = "pattern") -> Pattern:
    """'2:4' -> Pattern(2, 4); 'unstructured' -> Pattern(ratio=ratio); a number -> unstructured at it.

    Raises OptionError naming `option` for N >= M, N < 0, M < 1 or a ratio outside [0, 1).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        ratio, text = float(text), "unstructured"
    if text == "unstructured":
        if not 0.0 <= ratio < 1.0:
            raise OptionError(f"'nm_sparsity': option '{option}' ratio must be in [0, 1), got {ratio}")
        return Pattern(ratio=float(ratio))
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not found:
        raise OptionError(f"'nm_sparsity': option '{option}' must be 'N:M' or 'unstructured', got {text!r}")
    n, m = int(found.group(1)), int(found.group(2))
    if m < 1 or not 0 <= n < m:
        raise OptionError(f"'nm_sparsity': option '{option}' needs 0 <= N < M, got {n}:{m}")
    return Pattern(n=n, m=m)


def name_matches(name: str, patterns) -> bool:
    """Whether `name` matches one of `patterns`: globs, or regular expressions written 're:...'."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def to_canonical(values: np.ndarray, in_axis: int) -> np.ndarray:
    """The [out, in] view of a 2-D weight whose input dim is `in_axis`."""
    return values.T if in_axis == 0 else values


def from_canonical(values: np.ndarray, in_axis: int) -> np.ndarray:
    return np.ascontiguousarray(values.T if in_axis == 0 else values)


# ------------------------------------------------------------------------------- scores
def magnitude_scores(w: np.ndarray) -> np.ndarray:
    return np.abs(w)


def wanda_scores(w: np.ndarray, input_norm: np.ndarray) -> np.ndarray:
    """|W_ij| · ‖X_j‖ (Wanda), `input_norm` the L2 norm of each input channel over calibration rows."""
    return np.abs(w) * np.asarray(input_norm, dtype=np.float64)[None, :]


# -------------------------------------------------------------------------------- masks
def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the `n` highest scores of every `m` consecutive inputs (True = kept); [out, in]."""
    rows, cols = scores.shape
    if cols % m:
        raise UnsupportedGraphError(f"N:M {n}:{m}: input dim {cols} is not a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep.reshape(rows, cols)


def unstructured_mask(scores: np.ndarray, ratio: float, scope: str = "row") -> np.ndarray:
    """Drop the `ratio` lowest scores per output row ('row', as Wanda) or over the layer ('layer')."""
    if ratio <= 0:
        return np.ones(scores.shape, dtype=bool)
    if scope == "row":
        k = int(scores.shape[1] * ratio)
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
        keep = np.ones(scores.shape, dtype=bool)
        np.put_along_axis(keep, order, False, axis=1)
        return keep
    k = int(scores.size * ratio)
    order = np.argsort(scores, axis=None, kind="stable")[:k]
    keep = np.ones(scores.size, dtype=bool)
    keep[order] = False
    return keep.reshape(scores.shape)


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

    The OBS column sweep of `graphopt.obs` with pruning as the replacement: N:M groups are chosen
    per group of M columns as the sweep reaches them, unstructured masks per block of `blocksize`
    columns (over the block: 'layer'; per row: 'row'), by w²/[H⁻¹]ⱼⱼ²; the pruned entries' error
    moves to the kept ones. H gets `dampening`·mean(diag H) on its diagonal. Returns (pruned
    weight as float32, keep mask).
    """
    import torch

    cols = w.shape[1]
    if pattern.structured and cols % pattern.m:
        raise UnsupportedGraphError(f"N:M {pattern.label}: input dim {cols} is not a multiple of {pattern.m}")
    W, hinv = obs.prepare(w, hessian, dampening, "SparseGPT")
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

    W = obs.sweep(W, hinv, replace, blocksize)
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


# ------------------------------------------------------------------------------ checks
def is_n_m(values: np.ndarray, axis: int, n: int, m: int) -> bool:
    """At most n non-zeros in every group of m consecutive elements along `axis`."""
    if values.ndim < 2 or values.shape[axis] % m:
        return False
    groups = np.moveaxis(values, axis, -1).reshape(-1, m)
    return bool(np.all(np.count_nonzero(groups, axis=1) <= n))


def sparsity_of(values: np.ndarray) -> float:
    return float(1.0 - np.count_nonzero(values) / max(values.size, 1))


def check_pattern(values: np.ndarray, pattern: Pattern, axis: int, name: str, keep: np.ndarray | None = None) -> None:
    """Raise UnsupportedGraphError naming weight `name` when it violates `pattern` (or its mask)."""
    if pattern.structured and not is_n_m(values, axis, pattern.n, pattern.m):
        raise UnsupportedGraphError(
            f"'nm_sparsity': weight '{name}' violates {pattern.label} along axis {axis} after pruning")
    if keep is not None and np.any(values[~keep] != 0):
        raise UnsupportedGraphError(f"'nm_sparsity': weight '{name}' has non-zeros where its mask prunes")


def reconstruction_error(w: np.ndarray, w_new: np.ndarray, hessian: np.ndarray) -> float:
    """‖XW − XŴ‖ / ‖XW‖ over the calibration rows, from H ∝ XᵀX (weights [out, in])."""
    import torch

    H = torch.tensor(hessian, dtype=torch.float64)
    W = torch.tensor(w, dtype=torch.float64)
    D = W - torch.tensor(w_new, dtype=torch.float64)
    num = torch.einsum("oi,ij,oj->", D, H, D).item()
    den = torch.einsum("oi,ij,oj->", W, H, W).item()
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
