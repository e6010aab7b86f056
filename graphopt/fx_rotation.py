"""A residual-stream rotation applied to an FX model's parameters (the rotate pass's FX form).

The roles (tables, writers, norm readers) come from graphopt.residual on the lowered graph, whose
weights carry the module's parameter names (a tied table as NAME.T). Torch keeps linear weights
as [out, in], the transpose of the ONNX MatMul's [in, out], so with R the rotation:
    table rows      e ↦ e·R              torch [V, d]:   T ↦ T·R
    writer          W ↦ W·R              torch [d, in]:  W ↦ Rᵀ·W
    norm reader     W ↦ Rᵀ·diag(γ)·W     torch [out, d]: W ↦ W·diag(γ)·R, and γ ↦ ones
A tied lm_head's γ becomes a linear by Rᵀ·diag(γ)·R (a new parameter), as in the ONNX form. The
algebra is graphopt.residual.rotated_weights, applied in the ONNX layout and transposed back.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from graphopt.errors import UnsupportedGraphError
from graphopt.ir import Model
from graphopt.residual import ResidualStream, rotated_weights

__all__ = ["rotate_parameters"]

_LINEAR = torch.ops.aten.linear.default
_MUL = torch.ops.aten.mul.Tensor


def _value(gm, name: str) -> np.ndarray:
    return gm.get_parameter(name).detach().cpu().double().numpy()


def _set_parameter(gm, name: str, value: np.ndarray) -> None:
    """Replace parameter `name` under every name it has (a tied table has two); never written into,
    since FX models share parameters with their copies."""
    old = gm.get_parameter(name)
    new = torch.nn.Parameter(torch.from_numpy(value).to(old.dtype), requires_grad=old.requires_grad)
    for full, param in list(gm.named_parameters(remove_duplicate=False)):
        if param is old:
            owner, _, attr = full.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, attr, new)


def _gamma_mul(node, width: int, gm):
    """(mul node, γ get_attr node, normalized input) when `node` is Mul(γ, x) with γ a [width] parameter."""
    if node.op != "call_function" or node.target is not _MUL or len(node.args) != 2:
        return None
    for i, arg in enumerate(node.args):
        other = node.args[1 - i]
        if getattr(arg, "op", None) == "get_attr" and tuple(gm.get_parameter(arg.target).shape) == (width,):
            return node, arg, other
    return None


def rotate_parameters(model: Model, stream: ResidualStream, r: np.ndarray, gain_name: Callable[[str], str]) -> int:
    """Rotate `model.fx` in place by `r` along `stream` (found on its lowered form); returns the
    number of γs turned into a linear (tied lm_heads)."""
    gm = model.fx
    graph = gm.graph
    linears = {n.args[1].target: n for n in graph.nodes
               if n.op == "call_function" and n.target is _LINEAR and getattr(n.args[1], "op", None) == "get_attr"}
    stored_as_is = {e.table for e in stream.embeddings if e.axis == 0}  # [V, d] in both layouts

    def linear(onnx_name: str):
        name = onnx_name.removesuffix(".T")
        if name not in linears:
            raise UnsupportedGraphError(f"rotate (FX): no linear reads parameter '{name}' of the lowered graph's '{onnx_name}'")
        return linears[name]

    def onnx_layout(name: str, value: np.ndarray) -> np.ndarray:  # and back: a transpose is its own inverse
        return value if name in stored_as_is else value.T

    # find every γ (by the linears reading it: identical γs may share one ONNX constant) before any change
    gains_found = {}
    for norm in stream.norms:
        inputs = {id(linear(w).args[0]): linear(w).args[0] for w in norm.readers}
        if len(inputs) != 1:
            raise UnsupportedGraphError(f"rotate (FX): the readers of norm '{norm.normalized}' do not share one input")
        x = next(iter(inputs.values()))
        found = _gamma_mul(x, stream.width, gm)
        if (found is None) != (norm.gamma is None):
            raise UnsupportedGraphError(f"rotate (FX): the input '{x.name}' of '{norm.readers[0]}' does not match the "
                                        "lowered graph's norm gain")
        gains_found[norm.normalized] = found
    gammas = {key: _value(gm, found[1].target) if found else None for key, found in gains_found.items()}
    new, gains = rotated_weights(stream, r, lambda n: onnx_layout(n, _value(gm, n.removesuffix(".T"))), gammas)
    for name, value in new.items():
        _set_parameter(gm, name.removesuffix(".T"), np.ascontiguousarray(onnx_layout(name, value)))
    for key, found in gains_found.items():
        if key in gains:
            _gain_to_linear(gm, *found, gains[key], gain_name)
        elif found:
            _set_parameter(gm, found[1].target, np.ones(stream.width))
    graph.lint()
    gm.recompile()
    return len(gains)


def _gain_to_linear(gm, mul, gamma_attr, normalized, gain: np.ndarray, gain_name: Callable[[str], str]) -> None:
    """Mul(γ, x) -> linear(x, gain) with gain a new parameter (torch layout: the transpose of [in, out]);
    γ's parameter goes when nothing else reads it."""
    graph = gm.graph
    name = gain_name(gamma_attr.target)
    owner, _, attr = name.rpartition(".")
    gm.get_submodule(owner).register_parameter(attr, torch.nn.Parameter(torch.from_numpy(gain.T.copy()).float()))
    with graph.inserting_before(mul):
        weight = graph.get_attr(name)
        gained = graph.call_function(_LINEAR, (normalized, weight))
    mul.replace_all_uses_with(gained)
    graph.erase_node(mul)
    if not gamma_attr.users:
        graph.erase_node(gamma_attr)
        gamma_owner, _, gamma_name = gamma_attr.target.rpartition(".")
        delattr(gm.get_submodule(gamma_owner) if gamma_owner else gm, gamma_name)
