"""Benchmark-level evaluation of a Model: LM perplexity/overlap on token windows, ORT latency, disk size.

The fidelity, quantization and sparsity benchmarks all print the same row for a model, so the
row is computed here once: `benchmark_causal_lm` = `evaluate_causal_lm` + `disk_bytes` +
`ort_latency`, and `markdown_table` prints rows side by side.

Reference logits of a 49k-vocabulary LM take 25 MB per 128-token window, so the reference a run
hands back is compact: the top-k token indices per position (top-1 first), which is all overlap@k
needs. `reference_logits` accepts either that compact form or full float logits.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from graphopt import onnx_io
from graphopt.errors import GraphoptError
from graphopt.ir import Model
from graphopt.metrics import nll_sum

__all__ = [
    "top_k_indices",
    "evaluate_causal_lm",
    "ort_latency",
    "disk_bytes",
    "benchmark_causal_lm",
    "markdown_table",
    "environment",
]


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
    windows, `threads` of its own; 0: one per core) or any callable `input_ids -> logits`. `windows` are token-id arrays ([seq] or
    [batch, seq]). `reference_logits` (one entry per window) are full logits or the top-k indices
    this function returns. Returns the row {"ppl", "overlap@1", "overlap@k"} and this model's
    top-k indices per window, to serve as the reference of later runs.
    """
    run = _logits_fn(model, threads)
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


def _logits_fn(model, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    if not isinstance(model, Model):
        return model
    if model.task != "causal-lm":
        raise GraphoptError(f"'{model.name}' is a {model.task} model; evaluate_causal_lm needs logits")
    name = model.inputs[0].name
    runner = model.runner(threads)
    return lambda ids: runner({name: ids})[0]


def ort_latency(model: Model, feeds: dict[str, np.ndarray], repeats: int = 10, *, warmup: int = 2,
                threads: int = 0, session=None) -> dict[str, float]:
    """Wall-clock latency of one onnxruntime CPU run on `feeds`, in milliseconds.

    Returns {"median_ms", "min_ms", "p90_ms", "repeats"}; `threads=0` lets ORT choose. On a shared
    machine the minimum is the steadiest figure, the median the honest one.
    """
    model.require("onnx", "ort_latency")
    if repeats < 1:
        raise GraphoptError(f"ort_latency: repeats must be >= 1, got {repeats}")
    session = session or onnx_io.ort_session(model.to_onnx(), threads=threads, consume=True)
    names = [i.name for i in session.get_inputs()]
    feeds = {n: feeds[n] for n in names}
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "p90_ms": times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))],
        "repeats": repeats,
    }


def disk_bytes(model: Model) -> int:
    """Bytes the ONNX form takes on disk when saved by `Model.save` (model file + external data)."""
    model.require("onnx", "disk_bytes")
    with tempfile.TemporaryDirectory(prefix="graphopt-size-") as tmp:
        model.replace(source=None).save(Path(tmp) / "model.onnx")
        return sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())


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
    session = onnx_io.ort_session(model.to_onnx(), threads=threads, optimization=optimization, consume=True,
                                  config=config)
    name = model.inputs[0].name
    row, tops = evaluate_causal_lm(lambda ids: session.run(None, {name: ids})[0], windows, reference_logits, k=k)
    ids = np.atleast_2d(windows[0])[:1, :latency_seq].astype(np.int64)
    latency = ort_latency(model, {name: ids}, latency_repeats, session=session)
    row["bytes"] = disk_bytes(model)
    row["params"] = model.num_params()
    row["latency_ms"] = latency["median_ms"]
    row["latency_min_ms"] = latency["min_ms"]
    return row, tops


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows (each with a "name") as a Markdown table: bytes in MB, ppl to 3 decimals, times in ms/s."""
    if not rows:
        return ""
    columns = columns or [c for c in rows[0] if c != "name"]
    head = ["name"] + [_header(c) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row.get("name", ""))] + [_cell(c, row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _header(column: str) -> str:
    return {"bytes": "MB on disk", "latency_ms": "latency ms", "latency_min_ms": "min ms",
            "pipeline_s": "pipeline s"}.get(column, column)


_FORMATS = {"ppl": "{:.3f}", "latency_ms": "{:.1f}", "latency_min_ms": "{:.1f}", "pipeline_s": "{:.1f}"}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "—"
    if column == "bytes":
        return f"{value / 1e6:.1f}"
    if column == "params":
        return f"{value / 1e6:.2f}M"
    if column in _FORMATS and isinstance(value, (int, float)):
        return _FORMATS[column].format(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


VERSIONED = ("graphopt", "torch", "onnxruntime", "onnx", "transformers", "numpy")


def environment(**extra: Any) -> dict[str, Any]:
    """Where a benchmark ran: Python, processor, cores and the versions its figures depend on.

    W8A8 overlap@1 moves by ~0.008 between onnxruntime releases (their fused integer kernels round
    differently), so a recorded figure carries the versions that produced it.
    """
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "processor": platform.machine(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "versions": versions, **extra}
