"""smooth_quant: SmoothQuant's migration of activation outliers into the weights, exact in float."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.capture import capture
from graphopt.analysis.linear_sites import LinearSite, linear_sites
from graphopt.errors import OptionError
from graphopt.ir import Model, consumers
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant import numerics
from graphopt.quant.observers import MinMaxObserver
from graphopt.quant.plan import weight_matches

__all__ = ["SmoothQuant"]


def _only_reader(tensor: gs.Tensor, node: gs.Node, users: dict) -> bool:
    return [id(n) for n in users.get(id(tensor), [])] == [id(node)]


def _column_weight(node: gs.Node | None, width: int, users: dict) -> gs.Constant | None:
    """The constant [in, width] weight of a MatMul that only this MatMul reads, else None."""
    if node is None or node.op != "MatMul" or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if isinstance(weight, gs.Constant) and weight.values.ndim == 2 and weight.values.shape[1] == width \
            and _only_reader(weight, node, users):
        return weight
    return None


def _producer_constant(point: gs.Tensor, width: int, users: dict) -> gs.Constant | None:
    """The constant whose last axis scales `point` channel by channel (rules 1a-1c), else None."""
    producer = point.inputs[0] if point.inputs else None
    if producer is None:
        return None
    if producer.op == "MatMul":
        return _column_weight(producer, width, users)
    if producer.op != "Mul":
        return None
    for operand in producer.inputs:
        if isinstance(operand, gs.Constant) and operand.values.shape == (width,) and _only_reader(operand, producer, users):
            return operand
    for operand in producer.inputs:
        if isinstance(operand, gs.Variable) and operand.inputs and _only_reader(operand, producer, users):
            found = _column_weight(operand.inputs[0], width, users)
            if found is not None:
                return found
    return None


def _fold(constant: gs.Constant, s: np.ndarray) -> None:
    """Divide the last axis of `constant` by s (a new array: weight arrays are shared between copies)."""
    constant.values = (np.asarray(constant.values, np.float32) / s).astype(np.float32)


def _scale_rows(weight: gs.Constant, s: np.ndarray) -> None:
    weight.values = (np.asarray(weight.values, np.float32) * s[:, None]).astype(np.float32)


@register_pass
@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Move activation outliers into the weights that read them (SmoothQuant, Xiao et al. 2023).

    Reads calibration feeds (`ctx.calib`): the per-channel max |X_j| of every smoothable point
    (one run of the float model; the `quantize` pass after it calibrates the smoothed model again,
    a second run, because its observers need the smoothed values). For each activation X read only
    by MatMul layers with constant [in, out] weights that nothing else reads (with `weights`, only
    the inputs of linears whose weight matches), the factors s_j = max|X_j|^α / max|W_j|^(1−α)
    (numerics.smooth_scales) divide X and multiply the weights' rows j. Dividing X is folded
    into its producer:
      1a. a Mul by a constant vector (an RMSNorm / LayerNorm gain) that only the Mul reads;
      1b. a Mul of a MatMul output that only the Mul reads (SwiGLU's up_proj): that weight's columns;
      1c. a MatMul with a constant weight only it reads: its columns.
    Does NOT fire where the producer is anything else (attention's output before o_proj), where
    X or a weight has readers outside the match (a residual add), or on a quantized graph:
    `changed` is False and the model is untouched.
    Guarantees: the graph computes the same function in float; outputs agree within float32
    rounding (relative error about 1e-6 on the tiny Llama). Leaves no metadata.
    """

    name: ClassVar[str] = "smooth_quant"
    mutates_input: ClassVar[bool] = True

    alpha: float = field(default=0.5, metadata={"help": "migration strength in (0, 1]: the share of the "
                                                         "activation range moved into the weights"})
    weights: tuple[str, ...] = field(default=(), metadata={
        "help": "smooth only the inputs of linears whose weight matches (names, globs, 're:...'); empty: every input"})

    def check(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise OptionError(f"'smooth_quant': option 'alpha' must be in (0, 1], got {self.alpha}")

    def _plans(self, model: Model) -> dict[str, tuple[gs.Constant, list[LinearSite]]]:
        """point -> (the producer's constant to divide, the consumer sites), in graph order."""
        by_point: dict[str, list[LinearSite]] = {}
        for site in linear_sites(model):
            by_point.setdefault(site.activation, []).append(site)
        tensors, users = model.graph.tensors(), consumers(model.graph)
        plans = {}
        for point, sites in by_point.items():
            if self.weights and not any(weight_matches(s.weight, self.weights) for s in sites):
                continue
            if any(s.op != "MatMul" for s in sites) or len(users.get(id(tensors[point]), [])) != len(sites):
                continue
            if any(len(users.get(id(tensors[s.weight]), [])) != 1 for s in sites):
                continue
            constant = _producer_constant(tensors[point], tensors[sites[0].weight].values.shape[0], users)
            if constant is not None:
                plans[point] = (constant, sites)
        return plans

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        plans = self._plans(model)
        if not plans:
            return PassResult(model, False, {"smoothed": 0})
        calib = ctx.require_calib(self.name)
        ranges = capture(model, calib, list(plans), lambda _: MinMaxObserver(axis=-1), progress=ctx.progress,
                         desc="smooth_quant: calibrating")
        tensors = model.graph.tensors()
        for point, (constant, sites) in plans.items():
            lo, hi = ranges[point].range()
            weight_max = np.max([np.abs(tensors[s.weight].values).max(axis=1) for s in sites], axis=0)
            s = numerics.smooth_scales(np.maximum(-lo, hi), weight_max, self.alpha)
            _fold(constant, s)
            for site in sites:
                _scale_rows(tensors[site.weight], s)
        return PassResult(model, True, {"smoothed": len(plans)})
