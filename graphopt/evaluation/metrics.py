"""Fidelity metrics: SQNR, cosine, overlap@k, perplexity; one implementation each."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

__all__ = ["sqnr_db", "cosine", "overlap_at_k", "perplexity", "nll_sum", "compare_outputs"]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖ref‖² / ‖ref − test‖²); inf when equal."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def cosine(reference: np.ndarray, test: np.ndarray, axis: int | None = -1) -> float:
    """Mean cosine similarity along `axis` (rows), or of the flattened tensors when axis is None."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    if axis is None or a.ndim == 0:
        a, b, axis = a.reshape(1, -1), b.reshape(1, -1), -1
    num = np.sum(a * b, axis=axis)
    den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    safe = np.where(den == 0, 1.0, den)
    return float(np.mean(np.where(den == 0, np.where(num == 0, 1.0, 0.0), num / safe)))


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]


def overlap_at_k(reference_logits: np.ndarray, test_logits: np.ndarray, k: int = 1) -> float:
    """Mean over positions of |top-k(ref) ∩ top-k(test)| / k; k=1 is top-1 agreement."""
    ref = np.asarray(reference_logits).reshape(-1, reference_logits.shape[-1])
    test = np.asarray(test_logits).reshape(-1, test_logits.shape[-1])
    if k == 1:
        return float(np.mean(ref.argmax(-1) == test.argmax(-1)))
    ref_top, test_top = _topk(ref, k), _topk(test, k)
    hits = (ref_top[:, :, None] == test_top[:, None, :]).any(-1).sum(-1)
    return float(np.mean(hits / k))


def nll_sum(logits: np.ndarray, input_ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    logits = np.asarray(logits, dtype=np.float64)[:, :-1]
    targets = np.asarray(input_ids)[:, 1:]
    peak = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return float(np.sum(log_z - picked)), int(targets.size)


def perplexity(run_logits: Callable[[np.ndarray], np.ndarray], windows: Iterable[np.ndarray]) -> float:
    """exp(mean next-token NLL) over token windows (each [seq] or [batch, seq])."""
    total, count = 0.0, 0
    for window in windows:
        ids = np.atleast_2d(window)
        loss, n = nll_sum(run_logits(ids), ids)
        total, count = total + loss, count + n
    return float(np.exp(total / count))


def compare_outputs(reference: list[np.ndarray], test: list[np.ndarray], task: str, k: int = 8) -> dict:
    """Fidelity of `test` against `reference` outputs (first output is the one that matters).

    Always SQNR and cosine; for causal LMs also overlap@1 and overlap@k of the logits.
    """
    row = {"sqnr_db": sqnr_db(reference[0], test[0]), "cosine": cosine(reference[0], test[0], axis=-1)}
    if task == "causal-lm":
        row["overlap@1"] = overlap_at_k(reference[0], test[0], 1)
        row[f"overlap@{k}"] = overlap_at_k(reference[0], test[0], k)
    return row
