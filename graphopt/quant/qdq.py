"""Writing encodings into an ONNX graph as QuantizeLinear/DequantizeLinear (QDQ) nodes.

The quantize pass (which chooses encodings by calibration) and fold_encodings (which takes them
from a file) both end here, so one set of encodings always gives the same graph, byte for byte.

Layout (what ONNX Runtime's QDQ fusions expect, as its own `quantize_static` lays it out):
- weight W (a float initializer): an integer initializer `W_quantized` (+ `W_scale`,
  `W_zero_point`) → DequantizeLinear `W_DequantizeLinear` whose output is named `W`, so every
  consumer (a MatMul, a Gather of a tied embedding table, ...) reads it under its old name.
- activation x: x → QuantizeLinear `x_QuantizeLinear` → `x_quantized` → DequantizeLinear
  `x_DequantizeLinear` → `x_dequantized`, which the consumers of x read instead of x.
- bias b of a linear whose input and weight are both quantized: `b_quantized` int32 with scale
  s_x·s_w (zero point 0), DequantizeLinear output named `b`.
Float encodings (dtype "float") mean "keep this tensor float": nothing is inserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.errors import UnsupportedGraphError
from graphopt.ir import consumers
from graphopt.quant import numerics
from graphopt.quant.encodings import Encoding, Encodings
from graphopt.quant.spec import QuantSpec

__all__ = ["QDQResult", "apply_encodings", "add_weight_offsets", "constant", "weight_axes", "bias_of"]


@dataclass
class QDQResult:
    """What `apply_encodings` did, by tensor name."""

    weights: list[str] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    biases: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # named by an encoding, absent from the graph


def constant(name: str, values: np.ndarray) -> gs.Constant:
    """A graph constant of any numpy/ml_dtypes type (int4/uint4 pack two codes per byte on export)."""
    values = np.ascontiguousarray(values)
    if values.dtype.itemsize == 1 and values.dtype.name in ("int4", "uint4"):
        return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(values, name)))
    return gs.Constant(name, values)


def weight_axes(graph: gs.Graph, weight: gs.Constant, users: list[gs.Node]) -> tuple[int, int]:
    """(channel axis, block axis) of a weight from how it is used: MatMul [in, out] → (1, 0);
    Gemm transB / Conv [out, in, ...] → (0, 1); a Gather table → (its gather axis, the other)."""
    for node in users:
        if node.op == "MatMul" and node.inputs[1] is weight:
            return 1, 0
        if node.op == "Gemm" and node.inputs[1] is weight:
            return (0, 1) if node.attrs.get("transB", 0) else (1, 0)
        if node.op == "Conv" and node.inputs[1] is weight:
            return 0, 1
    for node in users:
        if node.op == "Gather" and node.inputs[0] is weight:
            axis = node.attrs.get("axis", 0) % weight.values.ndim
            return axis, 1 - axis if weight.values.ndim == 2 else axis
    raise UnsupportedGraphError(
        f"weight '{weight.name}' feeds no MatMul/Gemm/Conv/Gather: graphopt cannot tell its channel axis")


def resolve_axis(encoding: Encoding, graph: gs.Graph, weight: gs.Constant, users: list[gs.Node]) -> Encoding:
    """An encoding with its axis filled in from the graph when the file did not say (0.6.1)."""
    if encoding.enc_type == "PER_TENSOR" or encoding.axis is not None:
        return encoding
    channel, block = weight_axes(graph, weight, users)
    return encoding.with_axis(block if encoding.enc_type == "PER_BLOCK" else channel)


def bias_of(node: gs.Node, users: dict[int, list[gs.Node]]) -> tuple[gs.Node, int] | None:
    """(node, input index) of the constant bias added to a linear's output, if any: Gemm/Conv
    input 2, or an Add of a 1-D constant that is the MatMul output's only consumer."""
    if node.op in ("Gemm", "Conv") and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        return node, 2
    if node.op != "MatMul":
        return None
    readers = users.get(id(node.outputs[0]), [])
    if len(readers) != 1 or readers[0].op != "Add":
        return None
    add = readers[0]
    for i, t in enumerate(add.inputs):
        if isinstance(t, gs.Constant) and t.values.ndim == 1 and t is not node.outputs[0]:
            return add, i
    return None


def _dq_node(name: str, codes: gs.Tensor, scale: np.ndarray, zero_point: np.ndarray | None,
             output: gs.Variable, attrs: dict) -> gs.Node:
    inputs = [codes, gs.Constant(f"{name}_scale", np.asarray(scale, dtype=np.float32))]
    if zero_point is not None:
        inputs.append(constant(f"{name}_zero_point", zero_point))
    return gs.Node("DequantizeLinear", name=f"{name}_DequantizeLinear", inputs=inputs, outputs=[output], attrs=attrs)


def _quantize_weight(graph: gs.Graph, weight: gs.Constant, encoding: Encoding, users: list[gs.Node],
                     codes: np.ndarray | None) -> gs.Node:
    values = np.asarray(weight.values, dtype=np.float32)
    spec = encoding.spec
    scale, zero_point = encoding.params(values.shape)
    if codes is None:
        codes = numerics.quantize(values, scale, zero_point, spec)
    attrs = {}
    if encoding.enc_type != "PER_TENSOR":
        attrs["axis"] = int(encoding.axis % values.ndim)
    if encoding.enc_type == "PER_BLOCK":
        attrs["block_size"] = int(encoding.block_size)
    name = weight.name
    output = gs.Variable(name, dtype=np.float32, shape=list(values.shape))
    node = _dq_node(name, constant(f"{name}_quantized", codes.astype(spec.np_dtype)), scale,
                    zero_point.astype(spec.np_dtype), output, attrs)
    weight.name = f"{name}__float"  # the float value leaves the graph; its name goes to the DQ output
    for user in users:
        for i, t in enumerate(user.inputs):
            if t is weight:
                user.inputs[i] = output
    return node


def _quantize_activation(tensor: gs.Variable, encoding: Encoding, users: list[gs.Node]) -> list[gs.Node]:
    spec = encoding.spec
    scale, zero_point = encoding.params()
    name = tensor.name
    s = gs.Constant(f"{name}_scale", np.asarray(scale, dtype=np.float32))
    z = constant(f"{name}_zero_point", np.asarray(zero_point).astype(spec.np_dtype))
    codes = gs.Variable(f"{name}_quantized", dtype=spec.np_dtype, shape=tensor.shape)
    out = gs.Variable(f"{name}_dequantized", dtype=np.float32, shape=tensor.shape)
    q = gs.Node("QuantizeLinear", name=f"{name}_QuantizeLinear", inputs=[tensor, s, z], outputs=[codes])
    dq = gs.Node("DequantizeLinear", name=f"{name}_DequantizeLinear", inputs=[codes, s, z], outputs=[out])
    for user in users:
        for i, t in enumerate(user.inputs):
            if t is tensor:
                user.inputs[i] = out
    return [q, dq]


def _quantize_bias(bias: gs.Constant, x_scale: np.ndarray, w_scale: np.ndarray, reader: gs.Node, index: int) -> gs.Node:
    """int32 codes with scale s_x·s_w per output channel (what integer kernels accumulate in)."""
    values = np.asarray(bias.values, dtype=np.float32)
    scale = (np.float32(x_scale) * np.asarray(w_scale, dtype=np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, values.shape).copy() if scale.size > 1 else scale.reshape(())
    codes = np.clip(np.round(values / scale), -(2**31), 2**31 - 1).astype(np.int32)
    name = bias.name
    output = gs.Variable(name, dtype=np.float32, shape=list(values.shape))
    node = _dq_node(name, gs.Constant(f"{name}_quantized", codes), scale, None, output,
                    {"axis": 0} if scale.ndim else {})
    bias.name = f"{name}__float"
    reader.inputs[index] = output
    return node


def apply_encodings(graph: gs.Graph, encodings: Encodings, *, codes: dict[str, np.ndarray] | None = None,
                    quantize_bias: bool = True) -> QDQResult:
    """Insert Q/DQ for every int encoding whose tensor is in `graph` (in place), then sort.

    `codes` optionally gives precomputed integer weights (GPTQ) by weight name; other weights are
    rounded to nearest with their encoding. Returns which tensors were quantized and which
    encodings named tensors the graph does not have.
    """
    codes = codes or {}
    result = QDQResult()
    tensors = graph.tensors()
    users = consumers(graph)
    weight_scales: dict[str, np.ndarray] = {}
    new_nodes: list[gs.Node] = []
    for name in encodings:
        encoding = encodings[name]
        tensor = tensors.get(name)
        if tensor is None:
            result.missing.append(name)
            continue
        if encoding.dtype == "float":
            result.kept_float.append(name)
            continue
        readers = users.get(id(tensor), [])
        if not readers:
            continue
        if isinstance(tensor, gs.Constant):
            encoding = resolve_axis(encoding, graph, tensor, readers)
            new_nodes.append(_quantize_weight(graph, tensor, encoding, readers, codes.get(name)))
            weight_scales[name] = encoding.params(tensor.values.shape)[0]
            result.weights.append(name)
        else:
            new_nodes.extend(_quantize_activation(tensor, encoding, readers))
            result.activations.append(name)
    if quantize_bias:
        new_nodes.extend(_quantize_biases(graph, encodings, users, weight_scales, result))
    graph.nodes.extend(new_nodes)
    graph.toposort()
    return result


def add_weight_offsets(graph: gs.Graph, offsets: dict[str, tuple[np.ndarray, QuantSpec]]) -> list[str]:
    """Add back the float offsets of weights quantized as code · scale + offset (in place).

    `offsets` maps a MatMul weight W [K, N], already DequantizeLinear(codes, scale, zero point 0)
    under its own name, to (offset, spec): [ceil(K / block), N] per block along K (a shorter last
    block when block does not divide K), or [N] per channel (one block of K). Each MatMul(x, W)
    becomes MatMul(x, W) + MatMul(S(x), offset), where S(x) sums x over each block of K: one MatMul
    by a 0/1 matrix [K, ceil(K / block)], shared by every weight
    that reads x in the same blocks. Standard ops, any rank of x; the sum equals x times the
    offset-quantized weight up to float rounding. Returns the weights corrected.
    """
    tensors, users = graph.tensors(), consumers(graph)
    ones: dict[tuple[int, int], gs.Constant] = {}
    sums: dict[tuple[int, int], gs.Variable] = {}
    nodes, corrected = [], []
    for name, (offset, spec) in offsets.items():
        weight = tensors.get(name)
        readers = [u for u in users.get(id(weight), []) if u.op == "MatMul" and u.inputs[1] is weight]
        if weight is None or not readers:
            continue
        k, n = weight.shape
        block = spec.block_size if spec.granularity == "block" else k
        blocks = -(-k // block)
        table = gs.Constant(f"{name}_offset", np.asarray(offset, np.float32).reshape(blocks, n))
        if (k, block) not in ones:
            summing = np.kron(np.eye(blocks, dtype=np.float32), np.ones((block, 1), np.float32))[:k]
            ones[(k, block)] = gs.Constant(f"block_sums_{k}x{block}", summing)
        for index, node in enumerate(readers):
            x, y = node.inputs[0], node.outputs[0]
            key = (id(x), block)
            if key not in sums:
                sums[key] = gs.Variable(f"{x.name}_block{block}_sums", dtype=np.float32)
                nodes.append(gs.Node("MatMul", name=f"{x.name}_block{block}_sums", inputs=[x, ones[(k, block)]],
                                     outputs=[sums[key]]))
            main = gs.Variable(f"{y.name}_without_offset", dtype=np.float32)
            node.outputs.clear()
            node.outputs.append(main)
            shift = gs.Variable(f"{name}_offset_out{index or ''}", dtype=np.float32)
            nodes.append(gs.Node("MatMul", name=f"{name}_offset_MatMul{index or ''}", inputs=[sums[key], table],
                                 outputs=[shift]))
            nodes.append(gs.Node("Add", name=f"{name}_offset_Add{index or ''}", inputs=[main, shift], outputs=[y]))
        corrected.append(name)
    graph.nodes.extend(nodes)
    graph.toposort()
    return corrected


def _activation_source(tensor: gs.Tensor) -> str | None:
    """The name x of `tensor` when it is x → QuantizeLinear → DequantizeLinear → tensor."""
    dq = tensor.inputs[0] if tensor.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or not dq.inputs[0].inputs:
        return None
    q = dq.inputs[0].inputs[0]
    return q.inputs[0].name if q.op == "QuantizeLinear" else None


def _quantize_biases(graph, encodings, users, weight_scales, result) -> list[gs.Node]:
    nodes = []
    for node in list(graph.nodes):
        if node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
            continue
        w_name = node.inputs[1].name
        x_enc = encodings.activations.get(_activation_source(node.inputs[0]) or "")
        if w_name not in weight_scales or x_enc is None or x_enc.dtype != "int":
            continue
        w_scale = weight_scales[w_name]
        if w_scale.ndim > 1:
            continue  # blocked weights have no single accumulator scale per output channel
        found = bias_of(node, users)
        if found is None:
            continue
        reader, index = found
        bias = reader.inputs[index]
        if (np.asarray(bias.values).dtype != np.float32 or len(users.get(id(bias), [])) != 1
                or w_scale.size > 1 and bias.values.shape[-1] != w_scale.size):
            continue
        result.biases.append(bias.name)
        nodes.append(_quantize_bias(bias, x_enc.scale[0], w_scale, reader, index))
    return nodes
