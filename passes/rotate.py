"""rotate: an orthogonal rotation of the residual stream folded into the weights (QuaRot's R1).

The ONNX form rewrites initializers. The FX form (so QAT can start from the rotated model) finds
the same roles on the lowered graph (`ctx.lowered`), whose weights carry the module's parameter
names (a tied table as NAME.T), and applies the same algebra (graphopt.analysis.residual's
`rotated_weights`) to the parameters. Torch keeps linear weights as [out, in], the transpose of
the ONNX MatMul's [in, out], so with R the rotation:
    table rows      e ↦ e·R              torch [V, d]:   T ↦ T·R
    writer          W ↦ W·R              torch [d, in]:  W ↦ Rᵀ·W
    norm reader     W ↦ Rᵀ·diag(γ)·W     torch [out, d]: W ↦ W·diag(γ)·R, and γ ↦ ones
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
import torch

from graphopt.analysis.residual import ResidualStream, find_residual_stream, rotated_weights
from graphopt.errors import UnsupportedGraphError
from graphopt.ir import Model, consumers
from graphopt.ir.fx_graph import set_parameter
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass
from graphopt.quant.plan import FOLDED_GAINS
from graphopt.quant.rotation import rotation

__all__ = ["Rotate", "gain_matmul_name", "gain_matrices"]


def gain_matmul_name(gamma: str) -> str:
    """Name of the MatMul weight Rᵀ·diag(γ)·R that replaces a tied lm_head's norm gain `gamma`
    ('model.norm.weight' -> 'model.norm.rotated_gain'); the same in both forms."""
    owner, _, _ = gamma.rpartition(".")
    return f"{owner}.rotated_gain" if owner else f"{gamma}_rotated_gain"


def gain_matrices(model: Model) -> tuple[str, ...]:
    """The gain matrices a rotation left in `model` (either form), by `gain_matmul_name`: near
    identity, they want 16-bit weights (`int16_weights` of quantize and fake_quantize)."""
    names = model.graph.tensors() if model.form == "onnx" else dict(model.fx.named_parameters())
    return tuple(n for n in names if n.endswith("rotated_gain"))


@register_pass
@dataclass(frozen=True)
class Rotate(Pass):
    """Rotate the residual stream of a pre-RMSNorm transformer by an orthogonal R, in the weights.

    Reads nothing but the graph (graphopt.analysis.residual finds the stream). Rewrites, with R a
    randomized Hadamard matrix (graphopt.quant.rotation.rotation(width, seed)):
    1. embedding tables: rows e ↦ e·R;
    2. weights writing into the stream (o_proj, down_proj): W ↦ W·R;
    3. linears reading an RMSNorm: W ↦ Rᵀ·diag(γ)·W, the norm's γ set to ones (its Mul stays,
       so SmoothQuant can fold into it later). A linear whose weight is also the embedding table
       (a tied lm_head) already reads Rᵀ·W through the table; its γ becomes a MatMul by
       Rᵀ·diag(γ)·R instead (weight `gain_matmul_name(γ)`), which keeps the table shared. That
       matrix is near-identity: quantize it at 16 bits (quantize's `int16_weights`). The names
       such matrices would have where γ was folded instead (every untied reader) are recorded in
       `model.meta.extra["folded_gains"]`, so a recipe naming the final norm's matrix for tied
       models holds on untied ones (`quantize` finds nothing left to keep wide).
    The inputs of q/k/v, gate/up and the lm_head are then rotated: their outlier channels are
    spread over all channels, which is what per-tensor 8-bit activations need.
    Does NOT fire (changed False, with the reason) when the stream is used in any other way (a
    LayerNorm, a stream tensor as graph output, an already quantized weight) or a weight under a
    sparsity mask would be rotated. The FX form lowers the model first to find the stream (an
    export, cached by content hash) and refuses a model that already holds fake quantizers.
    Guarantees: the same function in exact arithmetic; float32 outputs agree to ~1e-5 relative.
    """

    name: ClassVar[str] = "rotate"
    mutates_input: ClassVar[bool] = True

    seed: int = field(default=0, metadata={"help": "seed of the Hadamard matrix's random signs"})

    def _stream(self, model: Model, onnx_form: Model) -> tuple[ResidualStream | None, str]:
        try:
            stream = find_residual_stream(onnx_form)
        except UnsupportedGraphError as exc:
            return None, str(exc)
        rotated = {e.table for e in stream.embeddings} | set(stream.writers) | {w for n in stream.norms for w in n.readers}
        masked = sorted(rotated & set(model.meta.masks))
        if masked:
            return None, f"weight '{masked[0]}' has a sparsity mask a rotation would fill"
        return stream, ""

    @staticmethod
    def _stats(stream: ResidualStream, gain_matmuls: int) -> dict:
        return {"width": stream.width, "tables": len(stream.embeddings), "writers": len(stream.writers),
                "norms": len(stream.norms), "gamma_matmuls": gain_matmuls}

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        stream, reason = self._stream(model, model)
        if stream is None:
            return PassResult(model, False, {"reason": reason})
        graph = model.graph
        tensors = graph.tensors()

        def value(name: str) -> np.ndarray:
            return np.asarray(tensors[name].values, np.float64)

        gammas = {norm.normalized: value(norm.gamma) if norm.gamma else None for norm in stream.norms}
        new, gains = rotated_weights(stream, rotation(stream.width, self.seed), value, gammas)
        for name, values in new.items():
            tensors[name].values = values.astype(np.float32)  # replaced, never written into (shared arrays)
        nodes, readers = {n.name: n for n in graph.nodes}, consumers(graph)
        for norm in stream.norms:
            if norm.normalized in gains:
                _gamma_to_matmul(nodes[norm.gamma_node], norm, gains[norm.normalized])
            elif norm.gamma:
                _gamma_to_ones(nodes[norm.gamma_node], norm, stream.width, readers)
        _record_folded(model, stream, gains)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(model, True, self._stats(stream, len(gains)))

    def run_fx(self, model: Model, ctx: PassContext) -> PassResult:
        from graphopt.training.fake_quant import fake_quant_modules

        if fake_quant_modules(model):
            return PassResult(model, False, {"reason": "the model holds fake quantizers; rotate before fake_quantize"})
        stream, reason = self._stream(model, ctx.lowered(model))
        if stream is None:
            return PassResult(model, False, {"reason": reason})
        gains = _rotate_parameters(model, stream, rotation(stream.width, self.seed), gain_matmul_name)
        _record_folded(model, stream, gains)
        return PassResult(model, True, self._stats(stream, len(gains)))


def _record_folded(model: Model, stream: ResidualStream, gains) -> None:
    """The gain matrix names of the norms whose γ went into their readers (not made a MatMul)."""
    folded = {gain_matmul_name(n.gamma) for n in stream.norms if n.gamma and n.normalized not in gains}
    model.meta.extra[FOLDED_GAINS] = sorted(folded | set(model.meta.extra.get(FOLDED_GAINS, ())))


def _gamma_to_ones(node: gs.Node, norm, width: int, readers: dict) -> None:
    """γ ↦ ones in a constant of this Mul's own (exporters share identical γs between norms)."""
    i = next(i for i, t in enumerate(node.inputs) if t.name == norm.gamma)
    shared = len(readers.get(id(node.inputs[i]), [])) > 1
    node.inputs[i] = gs.Constant(f"{norm.gamma_node}.weight" if shared else node.inputs[i].name, np.ones(width, np.float32))


def _gamma_to_matmul(node: gs.Node, norm, mixer: np.ndarray) -> None:
    """Mul(γ, x·r) -> MatMul(x·r, Rᵀ·diag(γ)·R)."""
    normalized = next(t for t in node.inputs if t.name == norm.normalized)
    weight = gs.Constant(gain_matmul_name(norm.gamma), mixer.astype(np.float32))
    node.op, node.inputs, node.attrs = "MatMul", [normalized, weight], {}


# ------------------------------------------------------------------------------- FX form
_LINEAR = torch.ops.aten.linear.default
_MUL = torch.ops.aten.mul.Tensor


def _value(gm, name: str) -> np.ndarray:
    return gm.get_parameter(name).detach().cpu().double().numpy()


def _gamma_mul(node, width: int, gm):
    """(mul node, γ get_attr node, normalized input) when `node` is Mul(γ, x) with γ a [width] parameter."""
    if node.op != "call_function" or node.target is not _MUL or len(node.args) != 2:
        return None
    for i, arg in enumerate(node.args):
        other = node.args[1 - i]
        if getattr(arg, "op", None) == "get_attr" and tuple(gm.get_parameter(arg.target).shape) == (width,):
            return node, arg, other
    return None


def _rotate_parameters(model: Model, stream: ResidualStream, r: np.ndarray, gain_name: Callable[[str], str]) -> dict:
    """Rotate `model.fx` in place by `r` along `stream` (found on its lowered form); returns the γs
    turned into a linear (tied lm_heads), by the norm's normalized tensor."""
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
        set_parameter(gm, name.removesuffix(".T"), np.ascontiguousarray(onnx_layout(name, value)))
    for key, found in gains_found.items():
        if key in gains:
            _gain_to_linear(gm, *found, gains[key], gain_name)
        elif found:
            set_parameter(gm, found[1].target, np.ones(stream.width))
    graph.lint()
    gm.recompile()
    return gains


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
