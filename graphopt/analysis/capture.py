"""Streaming statistics of activations over calibration batches, captured in onnxruntime.

Quantization calibration, sensitivity analysis, Wanda/SparseGPT/GPTQ and activation-aware
pruning all need statistics of the activations entering linear layers (`linear_sites`); the
capture run and the accumulators live here once. Ranges (min-max, per tensor or per channel) are
the observers' (`graphopt.quant.observers.MinMaxObserver`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import UnsupportedGraphError
from graphopt.ir import Model

__all__ = ["capture", "Accumulator", "InputHessian", "ChannelSquareSum", "ChannelMoments", "progress_bar"]


class Accumulator(Protocol):
    def update(self, x: np.ndarray) -> None: ...


class ChannelSquareSum:
    """Sum of squares per input channel (last axis) and row count: ‖X_j‖² for Wanda."""

    def __init__(self):
        self.sum_sq, self.rows = None, 0

    def update(self, x: np.ndarray) -> None:
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        sq = np.einsum("ij,ij->j", rows, rows)
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.rows += rows.shape[0]

    @property
    def norm(self) -> np.ndarray:
        return np.sqrt(self.sum_sq)


class ChannelMoments:
    """Per-channel sum, sum of squares and row count along `axis` (last: MatMul inputs, 1: NCHW).

    Gives the mean (bias compensation), the L2 norm (Wanda-style importance) and the variance
    (FLAP-style fluctuation) of each channel.
    """

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.sum = self.sum_sq = None
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        rows = np.moveaxis(x, self.axis, -1)
        rows = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
        s, sq = rows.sum(0), np.einsum("ij,ij->j", rows, rows)
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.rows += rows.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.rows, 1)

    @property
    def norm(self) -> np.ndarray:
        return np.sqrt(self.sum_sq)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sum_sq / max(self.rows, 1) - self.mean**2, 0.0)


class InputHessian:
    """H = 2/n · Σ xᵀx over rows of the activation (last axis = features): GPTQ / SparseGPT."""

    def __init__(self):
        self.h, self.rows = None, 0

    def update(self, x: np.ndarray) -> None:
        import torch

        rows = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32))
        # float32 products per batch (2x faster), summed in float64; torch's matmul is 1.4x numpy's here
        gram = (rows.T @ rows).numpy().astype(np.float64)
        self.h = gram if self.h is None else self.h + gram
        self.rows += rows.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        return 2.0 * self.h / max(self.rows, 1)


def progress_bar(iterable: Iterable, total: int | None, desc: str, enabled: bool = True):
    """tqdm when enabled and installed, the plain iterable otherwise."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def capture(
    model: Model,
    feeds: list[dict[str, np.ndarray]],
    tensors: list[str],
    make: Callable[[str], Accumulator],
    *,
    progress: bool = True,
    desc: str = "calibrating",
) -> dict[str, Accumulator]:
    """Run `feeds` through onnxruntime exposing `tensors` as outputs; fold each into an accumulator.

    `make(name)` builds the accumulator for one tensor. The model is not modified: a copy with
    the extra outputs is run.
    """
    model.require("onnx", "capture")
    graph = model.graph.copy()
    by_name = graph.tensors()
    missing = [t for t in tensors if t not in by_name]
    if missing:
        raise UnsupportedGraphError(f"capture: tensor '{missing[0]}' is not in graph '{model.name}'")
    wanted = []
    for name in dict.fromkeys(tensors):
        tensor = by_name[name]
        if isinstance(tensor, gs.Constant):
            continue
        if tensor.dtype is None:
            tensor.dtype = np.float32
        if tensor not in graph.outputs:
            graph.outputs.append(tensor)
        wanted.append(name)
    probe = model.replace(graph=graph)
    session = probe.session()
    accumulators = {name: make(name) for name in wanted}
    for batch in progress_bar(feeds, len(feeds), desc, progress):
        names = [i.name for i in session.get_inputs()]
        values = session.run(wanted, {n: batch[n] for n in names})
        for name, value in zip(wanted, values):
            accumulators[name].update(value)
    return accumulators
