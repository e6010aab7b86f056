"""fold_encodings: a static QDQ model with exactly the scales of an encodings file (no calibration)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.linear_sites import linear_sites
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir import Model, consumers
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant import qdq
from graphopt.quant.encodings import Encodings

__all__ = ["FoldEncodings"]


def _sole_constant_weight(node: gs.Node, users) -> gs.Constant | None:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(weight, gs.Constant) and len(users.get(id(weight), [])) == 1:
        return weight
    return None


def _take_output(producer: gs.Node, folded: gs.Node) -> None:
    """`producer` now computes what `folded` did: it takes over its output; `folded` is detached."""
    output = folded.outputs[0]
    folded.inputs.clear()
    folded.outputs.clear()
    producer.outputs.clear()
    producer.outputs.append(output)


def _fold_batchnorm(graph: gs.Graph, users) -> int:
    """Conv → BatchNormalization (inference form) becomes one Conv with scaled weights and a bias."""
    folded = 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        x = bn.inputs[0]
        conv = x.inputs[0] if x.inputs else None
        if conv is None or conv.op != "Conv" or len(users.get(id(x), [])) != 1 or len(bn.outputs) != 1:
            continue
        weight = _sole_constant_weight(conv, users)
        if weight is None or not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
            continue
        gamma, beta, mean, var = (np.asarray(t.values, np.float64) for t in bn.inputs[1:5])
        factor = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        bias = np.asarray(conv.inputs[2].values, np.float64) if len(conv.inputs) > 2 else np.zeros_like(mean)
        weight.values = (np.asarray(weight.values, np.float64) * factor.reshape(-1, *[1] * (weight.values.ndim - 1))).astype(np.float32)
        new_bias = gs.Constant(f"{weight.name}_folded_bias", ((bias - mean) * factor + beta).astype(np.float32))
        if len(conv.inputs) > 2:
            conv.inputs[2] = new_bias
        else:
            conv.inputs.append(new_bias)
        _take_output(conv, bn)
        folded += 1
    return folded


def _fold_scales(graph: gs.Graph, users) -> int:
    """MatMul(x, W) → Mul(·, c) with a constant c per output channel (or scalar) becomes MatMul(x, W·c)."""
    folded = 0
    for mul in [n for n in graph.nodes if n.op == "Mul"]:
        for i, source in enumerate(mul.inputs):
            other = mul.inputs[1 - i]
            linear = source.inputs[0] if isinstance(source, gs.Variable) and source.inputs else None
            if linear is None or linear.op != "MatMul" or not isinstance(other, gs.Constant):
                continue
            weight = _sole_constant_weight(linear, users)
            c = np.asarray(other.values, np.float32)
            if (weight is None or len(users.get(id(source), [])) != 1 or weight.values.ndim != 2
                    or c.size not in (1, weight.values.shape[1]) or c.ndim > 1):
                continue
            weight.values = (np.asarray(weight.values, np.float32) * c.reshape(1, -1)).astype(np.float32)
            _take_output(linear, mul)
            folded += 1
            break
    return folded


def _is_quantized(tensor: gs.Tensor) -> bool:
    """A weight already behind a DequantizeLinear, or an activation only read by QuantizeLinear."""
    if tensor.inputs and tensor.inputs[0].op == "DequantizeLinear":
        return True
    return bool(tensor.outputs) and all(n.op == "QuantizeLinear" for n in tensor.outputs)


@register_pass
@dataclass(frozen=True)
class FoldEncodings(Pass):
    """Turn given encodings into a static QDQ model: exactly those scales, no calibration run.

    Reads an AIMET/QNN encodings JSON (`encodings`: 1.0.0 or 0.6.1, e.g. exported by graphopt.training.fake_quant or
    a third-party tool) or, when no file is given, `model.meta.encodings`. Rewrites:

    1. BatchNormalization after a Conv, and a Mul by a per-channel/scalar constant after a MatMul,
       are folded into the weight (`fold_scales`), as QAT tools fold them before training.
    2. Every int encoding whose tensor is in the graph is written as graphopt.quant.qdq lays it out
       (the same code the quantize pass ends in): weights pre-quantized to integer initializers +
       DequantizeLinear, activations QuantizeLinear → DequantizeLinear. Float encodings keep the
       tensor float. Does NOT fire on tensors already produced by a DequantizeLinear.
    3. With `quantize_bias`, biases of quantized linears become int32 (scale s_x·s_w).

    Guarantees: the same encodings give the same bytes as the quantize pass that wrote them.
    `stats` names tensors in the file but not in the graph (`missing_in_graph`) and the linear
    inputs and weights left without an encoding (`unencoded`); `strict` makes either an error.
    Leaves the applied encodings in `model.meta.encodings`.
    """

    name: ClassVar[str] = "fold_encodings"
    mutates_input: ClassVar[bool] = True

    encodings: str = field(default="", metadata={"file": True, "help": "AIMET/QNN encodings JSON (empty: model.meta.encodings)"})
    fold_scales: bool = field(default=True, metadata={"help": "fold BatchNorm / constant Mul into the preceding weight"})
    quantize_bias: bool = field(default=False, metadata={"help": "int32 biases of quantized linears"})
    strict: bool = field(default=False, metadata={"help": "error when names are missing or points unencoded"})

    def check(self) -> None:
        if self.encodings and not self.encodings.endswith(".json"):
            raise OptionError(f"'fold_encodings': option 'encodings' must be a .json encodings file, got '{self.encodings}'")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        if self.encodings:
            found = Encodings.read(self.encodings)
        elif model.meta.encodings:
            found = Encodings.from_meta(model.meta.encodings)
        else:
            raise OptionError("'fold_encodings': no 'encodings' file given and the model carries no encodings "
                              "in its metadata (run quantize or QAT first, or name an AIMET/QNN JSON)")
        graph = model.graph
        tensors = graph.tensors()
        already = {name for name in found if name in tensors and _is_quantized(tensors[name])}
        todo = Encodings({n: e for n, e in found.activations.items() if n not in already},
                         {n: e for n, e in found.params.items() if n not in already})
        if not any(e.dtype == "int" and n in tensors for n, e in list(todo.activations.items()) + list(todo.params.items())):
            missing = [n for n in found if n not in tensors]
            return PassResult(model, False, {"missing_in_graph": missing[:50], "already_quantized": len(already)})
        stats: dict = {}
        if self.fold_scales:
            users = consumers(graph)
            stats["folded_batchnorm"] = _fold_batchnorm(graph, users)
            stats["folded_scales"] = _fold_scales(graph, consumers(graph))
            if stats["folded_batchnorm"] or stats["folded_scales"]:
                graph.cleanup(remove_unused_graph_inputs=False)
        unencoded = self._unencoded(model, found)
        result = qdq.apply_encodings(graph, todo, quantize_bias=self.quantize_bias)
        if self.strict and (result.missing or unencoded):
            where = f"encodings {self.encodings or 'from model.meta'}"
            first = result.missing[0] if result.missing else unencoded[0]
            raise UnsupportedGraphError(
                f"'fold_encodings': {where}: tensor '{first}' is "
                f"{'not in the graph' if result.missing else 'a quantization point without an encoding'} "
                f"({len(result.missing)} missing, {len(unencoded)} unencoded)")
        model.meta.encodings.update(todo.to_meta())
        stats.update(weights=len(result.weights), activations=len(result.activations), biases=len(result.biases),
                     kept_float=len(result.kept_float), missing_in_graph=result.missing[:50],
                     unencoded=unencoded[:50], already_quantized=len(already))
        return PassResult(model, True, {k: v for k, v in stats.items() if v or k in ("missing_in_graph", "unencoded")})

    @staticmethod
    def _unencoded(model: Model, found: Encodings) -> list[str]:
        """Linear inputs and weights the encodings say nothing about (they stay float)."""
        names = []
        for site in linear_sites(model):
            for name in (site.activation, site.weight):
                if name not in found and name not in names:
                    names.append(name)
        return names
