"""Where the weight-bearing ops of an ONNX graph are: MatMul / Gemm / Conv with a constant weight."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt.ir import Model

__all__ = ["LinearSite", "linear_sites", "ONLINE_ROTATION", "is_online_rotation"]

ONLINE_ROTATION = "online_rotation"  # weights named ONLINE_ROTATION.* are rotations computed at run time


def is_online_rotation(weight: str) -> bool:
    """Whether a MatMul weight is a rotation the `online_rotate` pass placed (not a linear layer)."""
    return weight.startswith(ONLINE_ROTATION + ".")


@dataclass(frozen=True)
class LinearSite:
    """A weight-bearing op: y = x @ W (MatMul, Gemm) or conv(x, W).

    `weight` is the initializer's name; `in_axis` is the weight axis that meets the activation
    (0 for MatMul's [in, out] weights, 1 for Gemm with transB=1 and for Conv's [out, in, kh, kw]).
    """

    node: str
    op: str
    activation: str
    weight: str
    output: str
    in_axis: int

    @property
    def out_axis(self) -> int:
        return 1 - self.in_axis if self.op != "Conv" else 0


def _constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def linear_sites(model: Model, *, min_size: int = 2) -> list[LinearSite]:
    """Every MatMul/Gemm/Conv whose weight is a constant (graph order).

    MatMuls between two activations (attention scores) are not sites, nor are the online
    rotations `online_rotate` places (`is_online_rotation`): fixed orthogonal matrices whose
    input stays float. Weights with fewer than `min_size` elements on an axis are skipped (they
    are not linear layers).
    """
    model.require("onnx", "linear_sites")
    sites = []
    for node in model.graph.nodes:
        if node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if not _constant(w) or _constant(x) or w.values.ndim < 2 or min(w.values.shape[:2]) < min_size:
            continue
        if is_online_rotation(w.name):
            continue
        if node.op == "MatMul" and w.values.ndim != 2:
            continue
        in_axis = 0
        if node.op == "Gemm":
            in_axis = 1 if node.attrs.get("transB", 0) else 0
        elif node.op == "Conv":
            in_axis = 1
        sites.append(LinearSite(node.name, node.op, x.name, w.name, node.outputs[0].name, in_axis))
    return sites
