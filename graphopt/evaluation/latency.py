"""Latency of a model in onnxruntime on the CPU, with the statistics a shared machine needs."""

from __future__ import annotations

import statistics
import time

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir import Model

__all__ = ["ort_latency"]


def ort_latency(model: Model, feeds: dict[str, np.ndarray], repeats: int = 10, *, warmup: int = 2,
                threads: int = 0, session=None) -> dict[str, float]:
    """Wall-clock latency of one onnxruntime CPU run on `feeds`, in milliseconds.

    Returns {"median_ms", "min_ms", "p90_ms", "repeats"}; `threads=0` lets ORT choose. On a shared
    machine the minimum is the steadiest figure, the median the honest one.
    """
    model.require("onnx", "ort_latency")
    if repeats < 1:
        raise GraphoptError(f"ort_latency: repeats must be >= 1, got {repeats}")
    session = session or model.session(threads)
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
