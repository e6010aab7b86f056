"""Per-input-channel scaling of linear layers, folded into the op that makes their input: exact in float.

SmoothQuant (`smooth_quant`) and AWQ (`awq`) both choose factors s_j for the input channels j of
an activation X read by MatMul layers and rewrite X·W as (X/s)·(s·W): the weights' rows j are
multiplied by s_j and X's producer is changed to emit X/s. They differ only in how s is chosen;
where a point can be scaled and how the fold is done live here once.

A point X can be scaled when every reader is a MatMul with a constant [in, out] weight that no
other node reads, and its producer is (rules of `smoothable_points`):
  1a. a Mul by a constant vector (an RMSNorm / LayerNorm gain) that only the Mul reads;
  1b. a Mul of a MatMul output that only the Mul reads (SwiGLU's up_proj): that weight's columns;
  1c. a MatMul with a constant weight only it reads: its columns.
Anything else (attention's output before o_proj, a residual Add, a weight with other readers such
as a tied embedding table) is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.linear_sites import LinearSite, linear_sites
from graphopt.ir import Model, consumers
from graphopt.quant.plan import weight_matches

__all__ = ["ScalablePoint", "smoothable_points", "apply_scales", "divide_columns", "multiply_rows"]


@dataclass(frozen=True)
class ScalablePoint:
    """An activation whose channels can be scaled: `producer` is the constant whose last axis is
    divided by s, `sites` the linears whose weight rows are multiplied by s."""

    point: str
    producer: gs.Constant
    sites: tuple[LinearSite, ...]


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


def smoothable_points(model: Model, weights: Sequence[str] = ()) -> list[ScalablePoint]:
    """The points of `model` that can be scaled (module rules), in graph order; with `weights`
    (names, globs, 're:...'), only the inputs of linears whose weight matches one of them."""
    by_point: dict[str, list[LinearSite]] = {}
    for site in linear_sites(model):
        by_point.setdefault(site.activation, []).append(site)
    tensors, users = model.graph.tensors(), consumers(model.graph)
    found = []
    for point, sites in by_point.items():
        if weights and not any(weight_matches(s.weight, weights) for s in sites):
            continue
        if any(s.op != "MatMul" for s in sites) or len(users.get(id(tensors[point]), [])) != len(sites):
            continue
        if any(len(users.get(id(tensors[s.weight]), [])) != 1 for s in sites):
            continue
        constant = _producer_constant(tensors[point], tensors[sites[0].weight].values.shape[0], users)
        if constant is not None:
            found.append(ScalablePoint(point, constant, tuple(sites)))
    return found


def divide_columns(constant: gs.Constant, s: np.ndarray) -> None:
    """Divide the last axis of `constant` by s (a new array: weight arrays are shared between copies)."""
    constant.values = (np.asarray(constant.values, np.float32) / s).astype(np.float32)


def multiply_rows(weight: gs.Constant, s: np.ndarray) -> None:
    weight.values = (np.asarray(weight.values, np.float32) * s[:, None]).astype(np.float32)


def apply_scales(model: Model, point: ScalablePoint, s: np.ndarray) -> None:
    """Rewrite X·W as (X/s)·(s·W) at `point` (in place): the producer's constant divided by s, every
    reading weight's rows multiplied by s. The model computes the same function in float."""
    s = np.asarray(s, np.float32)
    tensors = model.graph.tensors()
    divide_columns(point.producer, s)
    for site in point.sites:
        multiply_rows(tensors[site.weight], s)
