"""Language-model evaluation: perplexity and overlap@k against a reference on token windows.

The benchmarks print the same row for every model, so the row is computed here once:
`benchmark_causal_lm` = `evaluate_causal_lm` + `sizes.disk_bytes` + `latency.ort_latency`.

Reference logits of a 49k-vocabulary LM take 25 MB per 128-token window, so the reference a run
hands back is compact: the top-k token indices per position (top-1 first), which is all overlap@k
needs. `reference_logits` accepts either that compact form or full float logits.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.evaluation.latency import ort_latency
from graphopt.evaluation.metrics import nll_sum
from graphopt.evaluation.sizes import disk_bytes
from graphopt.ir import Model
from graphopt.ir.decoder import DecoderSpec, prefill_feeds

__all__ = ["top_k_indices", "evaluate_causal_lm", "benchmark_causal_lm", "logits_function"]


def top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits along the last axis, ordered largest first.

    Position 0 is exactly `argmax` (first index among ties), so overlap@1 matches
    `metrics.overlap_at_k(..., 1)`.
    """
    logits = np.asarray(logits)
    part = np.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(logits, part, axis=-1), axis=-1, kind="stable")
    top = np.take_along_axis(part, order, axis=-1)
    top[..., 0] = logits.argmax(-1)
    return top


def _as_top_k(reference: np.ndarray, k: int) -> np.ndarray:
    """Accept full float logits or already-reduced integer top-k indices."""
    reference = np.asarray(reference)
    if np.issubdtype(reference.dtype, np.integer):
        if reference.shape[-1] < k:
            raise GraphoptError(f"reference holds top-{reference.shape[-1]} indices, overlap@{k} needs {k}")
        return reference[..., :k]
    return top_k_indices(reference, k)


def _overlap(ref_top: np.ndarray, test_top: np.ndarray) -> float:
    """Mean over positions of |ref ∩ test| / k for two [..., k] index arrays."""
    k = ref_top.shape[-1]
    ref = ref_top.reshape(-1, k)
    test = test_top.reshape(-1, k)
    hits = (ref[:, :, None] == test[:, None, :]).any(-1).sum(-1)
    return float(np.mean(hits / k))


def evaluate_causal_lm(
    model: Model | Callable[[np.ndarray], np.ndarray],
    windows: list[np.ndarray],
    reference_logits: list[np.ndarray] | None = None,
    *,
    k: int = 8,
    threads: int = 0,
) -> tuple[dict[str, float], list[np.ndarray]]:
    """Perplexity over `windows` and, given a reference, overlap@1 and overlap@k against it.

    `model` is a causal-LM `Model` (FX runs in torch, ONNX in onnxruntime with one session for all
    windows, `threads` of its own; 0: one per core; a decoder runs each window as a prefill from
    an empty cache) or any callable `input_ids -> logits`. `windows` are token-id arrays ([seq] or
    [batch, seq]). `reference_logits` (one entry per window) are full logits or the top-k indices
    this function returns. Returns the row {"ppl", "overlap@1", "overlap@k"} and this model's
    top-k indices per window, to serve as the reference of later runs.
    """
    run = logits_function(model, threads)
    if reference_logits is not None and len(reference_logits) != len(windows):
        raise GraphoptError(f"{len(reference_logits)} reference entries for {len(windows)} windows")
    total, count, tops, hits1, hitsk = 0.0, 0, [], [], []
    for i, window in enumerate(windows):
        ids = np.atleast_2d(window).astype(np.int64)
        logits = np.asarray(run(ids), dtype=np.float32)
        loss, n = nll_sum(logits, ids)
        total, count = total + loss, count + n
        top = top_k_indices(logits, k)
        tops.append(top)
        if reference_logits is not None:
            ref = _as_top_k(reference_logits[i], k)
            hits1.append(float(np.mean(ref[..., 0] == top[..., 0])))
            hitsk.append(_overlap(ref, top))
    row = {"ppl": float(np.exp(total / count))}
    if reference_logits is not None:
        row["overlap@1"] = float(np.mean(hits1))
        row[f"overlap@{k}"] = float(np.mean(hitsk))
    return row, tops


def logits_function(model, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """`input_ids [batch, seq] -> logits [batch, seq, vocab]` of a causal-LM Model (one session,
    `threads` of its own; a decoder runs each row as a prefill from an empty cache), or `model`
    itself when it is already such a callable."""
    if not isinstance(model, Model):
        return model
    if model.task != "causal-lm":
        raise GraphoptError(f"'{model.name}' is a {model.task} model; evaluate_causal_lm needs logits")
    runner = model.runner(threads)
    spec = DecoderSpec.of(model)
    if spec is not None:  # a decoder: the logits of a prefill from an empty cache, a sequence at a time
        return lambda ids: np.concatenate([runner(prefill_feeds(spec, row[None]))[0] for row in ids])
    name = model.inputs[0].name
    return lambda ids: runner({name: ids})[0]


def benchmark_causal_lm(
    model: Model,
    windows: list[np.ndarray],
    reference_logits: list[np.ndarray] | None = None,
    *,
    k: int = 8,
    latency_seq: int = 128,
    latency_repeats: int = 10,
    threads: int = 0,
    optimization: str = "all",
    config: dict[str, str] | None = None,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One benchmark row for an ONNX causal LM: ppl, overlap@1/@k, bytes on disk, ORT latency.

    One onnxruntime session (graph `optimization` level and session `config`, see
    onnx_io.ort_session) serves both.
    Latency is measured on the first `latency_seq` tokens of the first window, batch 1.
    Returns the row and the top-k reference of this model (see `evaluate_causal_lm`).
    """
    model.require("onnx", "benchmark_causal_lm")
    session = model.session(threads, optimization=optimization, config=config)
    name = model.inputs[0].name
    row, tops = evaluate_causal_lm(lambda ids: session.run(None, {name: ids})[0], windows, reference_logits, k=k)
    ids = np.atleast_2d(windows[0])[:1, :latency_seq].astype(np.int64)
    latency = ort_latency(model, {name: ids}, latency_repeats, session=session)
    row["bytes"] = disk_bytes(model)
    row["params"] = model.num_params()
    row["latency_ms"] = latency["median_ms"]
    row["latency_min_ms"] = latency["min_ms"]
    return row, tops
