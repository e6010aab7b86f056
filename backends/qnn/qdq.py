"""QDQ <-> float model + encodings: what the package stores, and the QDQ model rebuilt from it."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import BackendError
from graphopt.ir import Model
from graphopt.quant import numerics
from graphopt.quant.encodings import Encoding, Encodings
from graphopt.quant.spec import QuantSpec


def _layout_spec(node: gs.Node, scale: np.ndarray) -> QuantSpec:
    """The parameter layout of a DequantizeLinear (tensor / channel / block along `axis`).

    `numerics.dequantize` reads only the layout of a spec (the codes carry their own type), so
    the spec's dtype is a placeholder; int32 bias codes have no QuantSpec type of their own.
    """
    block = int(node.attrs.get("block_size", 0) or 0)
    if scale.size == 1 and not block:
        return QuantSpec("int8", "tensor", symmetric=False)
    axis = int(node.attrs.get("axis", 1))
    return QuantSpec("int8", "block" if block else "channel", axis, block, symmetric=False)


def _consumers_to(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every reader of `old` (nodes, by identity) at `new`."""
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new


def _index_of(items, tensor) -> int | None:
    return next((i for i, t in enumerate(items) if t is tensor), None)


def _fold_constant_dq(graph: gs.Graph, node: gs.Node) -> None:
    """Replace DequantizeLinear(integer constant) by a float constant under the DQ output's name,
    with the values DequantizeLinear computes."""
    source, out = node.inputs[0], node.outputs[0]
    codes, scale = source.values, np.asarray(node.inputs[1].values)
    zero_point = node.inputs[2].values if len(node.inputs) > 2 and node.inputs[2].name else np.zeros_like(scale, np.int64)
    values = numerics.dequantize(codes, scale, zero_point, _layout_spec(node, scale))
    const = gs.Constant(out.name, values.astype(scale.dtype))
    out.name = f"{out.name}__dq"
    _consumers_to(graph, out, const)
    node.inputs.clear()
    node.outputs.clear()


def _is_bias_dq(node: gs.Node) -> bool:
    return (node.op == "DequantizeLinear" and isinstance(node.inputs[0], gs.Constant)
            and np.dtype(node.inputs[0].values.dtype) == np.int32)


def strip_qdq(model: Model) -> tuple[Model, Encodings, dict[str, str]]:
    """The float model the QNN converter reads, the encodings keyed by its tensor names, and the
    integer type each quantized tensor had (int8, uint8, int32 for biases...), keyed the same way.

    1. DequantizeLinear of an integer constant -> a float32 constant with the DQ output's name
       (graphopt names that after the original weight), values exactly as DequantizeLinear computes.
       int32 biases (scale s_x·s_w) get no encoding: QNN derives them, as `rebuild_qdq` does.
    2. QuantizeLinear(x) -> DequantizeLinear -> readers: the readers read x again.
    3. When that DQ output is a graph output, x takes the output's name (graph signatures are
       stable) and the activation encoding follows the rename.
    Every other node and every other tensor name stays as it was.
    """
    # a shallow metadata copy: the encodings travel in their own file, and deep-copying and
    # serialising thousands of per-channel scales in the float model's metadata costs seconds
    result = model.replace(graph=model.graph.copy(), meta=dataclasses.replace(
        model.meta, encodings={}, provenance=dict(model.meta.provenance)))
    graph = result.graph
    code_types: dict[str, str] = {}
    for node in [n for n in graph.nodes if _is_bias_dq(n)]:
        code_types[node.outputs[0].name] = "int32"
        _fold_constant_dq(graph, node)
    graph.cleanup(remove_unused_graph_inputs=False)
    encodings = Encodings.from_qdq_model(result)
    renames: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op != "DequantizeLinear" or not node.outputs:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if isinstance(source, gs.Constant):
            code_types[out.name] = _code_type(node)
            _fold_constant_dq(graph, node)
            continue
        producer = source.inputs[0] if source.inputs else None
        if producer is None or producer.op != "QuantizeLinear":
            raise BackendError(f"backend 'qnn': DequantizeLinear '{node.name}' reads '{source.name}', "
                               "which is neither a constant nor a QuantizeLinear output; QNN needs QDQ pairs")
        x = producer.inputs[0]
        code_types[x.name] = _code_type(node)
        _consumers_to(graph, out, x)
        position = _index_of(graph.outputs, out)
        if position is not None:
            renames[x.name] = out.name
            out.name, x.name = f"{out.name}__dq", out.name
            x.dtype, x.shape = out.dtype or x.dtype, out.shape or x.shape
            graph.outputs[position] = x
        node.inputs.clear()
        node.outputs.clear()
    for node in graph.nodes:
        if node.op == "QuantizeLinear" and node.outputs and not node.outputs[0].outputs:
            node.inputs.clear()
            node.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    leftovers = [n.name for n in graph.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")]
    if leftovers:
        raise BackendError(f"backend 'qnn': QuantizeLinear '{leftovers[0]}' has readers other than a "
                           "DequantizeLinear; QNN needs every quantized tensor as a Q -> DQ pair")
    renamed = Encodings(params=dict(encodings.params))
    for name, enc in encodings.activations.items():
        new = renames.get(name, name)
        renamed.add(dataclasses.replace(enc, name=new), "activation")
    code_types = {renames.get(name, name): kind for name, kind in code_types.items()}
    return result, renamed, code_types


def _code_type(dq: gs.Node) -> str:
    """The integer type of a DequantizeLinear's codes (its zero point's, or its constant input's)."""
    for tensor in (dq.inputs[2] if len(dq.inputs) > 2 else None, dq.inputs[0]):
        if isinstance(tensor, gs.Constant) and tensor.name:
            return np.dtype(tensor.values.dtype).name
    return "uint8"  # QuantizeLinear without a zero point produces uint8


def on_type(enc: Encoding, code_type: str | None, shape=None) -> tuple[QuantSpec, np.ndarray, np.ndarray]:
    """(spec, scale, zero point) of `enc` on the integer type `code_type` (default: the encoding's own).

    QNN offsets live on the unsigned grid, so a type only moves the zero point: zp = qmin − offset.
    """
    spec = enc.spec
    if enc.axis is not None and spec.granularity != "tensor":
        spec = dataclasses.replace(spec, axis=enc.axis)
    if code_type and code_type != spec.dtype:
        spec = dataclasses.replace(spec, dtype=code_type)
    zero_point = spec.qmin - enc.offset
    if shape is None and enc.enc_type == "PER_BLOCK":
        return spec, enc.scale, zero_point  # flat: enough for listing, not for DequantizeLinear
    scale, own_zero_point = enc.params(shape)
    return spec, scale, zero_point.reshape(np.shape(own_zero_point))


def rebuild_qdq(float_model: Model, encodings: Encodings, code_types: dict[str, str] | None = None, *,
                quantize_bias: bool = False) -> Model:
    """The QDQ model a package stands for, written by graphopt's one QDQ writer
    (`graphopt.quant.qdq.apply_encodings`: integer weights -> DQ, Q -> DQ on activations, int32
    biases with `quantize_bias`), then matched to what `strip_qdq` took apart:

    1. an activation that is a graph output is quantized too, its DQ output keeping the name;
    2. `code_types` (model_net.json's QNN datatypes) puts each tensor on its integer type, e.g.
       uint8 with zero point 128 where the encodings' convention says int8 with zero point 0:
       the same values, but onnxruntime fuses u8 and s8 QDQ groups into different kernels.
    """
    from graphopt.quant import qdq

    result = float_model.copy()
    graph = result.graph
    exits = _route_graph_outputs(graph, encodings)
    written = qdq.apply_encodings(graph, encodings, quantize_bias=quantize_bias)
    if written.missing:
        raise BackendError(f"encoding '{written.missing[0]}': the float model has no tensor of that name "
                           f"({len(written.missing)} such encodings)")
    _land_graph_outputs(graph, exits)
    _retype(graph, code_types or {})
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return result


def _route_graph_outputs(graph: gs.Graph, encodings: Encodings) -> list[gs.Node]:
    """Give each quantized graph output a reader (an Identity) so the writer quantizes it."""
    exits = []
    for position, tensor in enumerate(graph.outputs):
        if tensor.name in encodings.activations:
            out = gs.Variable(f"{tensor.name}__exit", dtype=tensor.dtype, shape=tensor.shape)
            exits.append(gs.Node("Identity", f"{tensor.name}__exit", inputs=[tensor], outputs=[out]))
            graph.nodes.append(exits[-1])
            graph.outputs[position] = out
    return exits


def _land_graph_outputs(graph: gs.Graph, exits: list[gs.Node]) -> None:
    """Undo `_route_graph_outputs`: the DQ output becomes the graph output, under the old name."""
    for identity in exits:
        dequantized, out = identity.inputs[0], identity.outputs[0]
        name = out.name.removesuffix("__exit")
        source = graph.tensors()[name]
        source.name, dequantized.name = f"{name}__float", name
        dequantized.dtype, dequantized.shape = out.dtype, out.shape
        graph.outputs[_index_of(graph.outputs, out)] = dequantized
        identity.inputs.clear()
        identity.outputs.clear()


def _retype(graph: gs.Graph, code_types: dict[str, str]) -> None:
    """Move Q/DQ pairs to the integer type `code_types` names (same bits, other signedness):
    codes and zero points shift by the difference of the types' smallest codes."""
    from graphopt.quant import qdq

    for node in graph.nodes:
        if node.op != "DequantizeLinear" or len(node.inputs) < 3:
            continue
        codes, zero = node.inputs[0], node.inputs[2]
        quantize = codes.inputs[0] if not isinstance(codes, gs.Constant) and codes.inputs else None
        name = quantize.inputs[0].name.removesuffix("__float") if quantize is not None else node.outputs[0].name
        have, want = np.dtype(zero.values.dtype).name, code_types.get(name)
        if not want or want == have or want.lstrip("u") != have.lstrip("u"):
            continue
        old, new = QuantSpec(have), QuantSpec(want)
        shift = new.qmin - old.qmin
        zero.values = (np.asarray(zero.values).astype(np.int32) + shift).astype(new.np_dtype)
        if quantize is not None:
            codes.dtype = new.np_dtype
        else:
            node.inputs[0] = qdq.constant(codes.name, (np.asarray(codes.values).astype(np.int32) + shift).astype(new.np_dtype))
