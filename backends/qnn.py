"""qnn: the package Qualcomm's converter consumes: float ONNX, AIMET/QNN encodings, model_net.json, HTP report."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.backend_infra import Artifact, Backend, paired_outputs, register_backend, validation_feeds
from graphopt.encodings import Encoding, Encodings
from graphopt.errors import BackendError
from graphopt.ir import Model
from graphopt.onnx_io import atomic_write_text, load_onnx, save_onnx, staged_folder
from graphopt.quant import numerics
from graphopt.quant.spec import QuantSpec

__all__ = [
    "Qnn", "QNN_OPS", "QNN_DATATYPES", "strip_qdq", "rebuild_qdq", "load_package", "check_encodings_v1",
    "htp_compatibility", "net_json",
]

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ QNN tables
# Qnn_DataType_t codes (QnnTypes.h): 0x0X08 / 0x0X16 / 0x0X32, the high byte the family.
QNN_DATATYPES = {
    "QNN_DATATYPE_INT_8": 0x0008, "QNN_DATATYPE_INT_16": 0x0016, "QNN_DATATYPE_INT_32": 0x0032,
    "QNN_DATATYPE_INT_64": 0x0064, "QNN_DATATYPE_UINT_8": 0x0108, "QNN_DATATYPE_UINT_16": 0x0116,
    "QNN_DATATYPE_UINT_32": 0x0132, "QNN_DATATYPE_UINT_64": 0x0164, "QNN_DATATYPE_FLOAT_16": 0x0216,
    "QNN_DATATYPE_FLOAT_32": 0x0232, "QNN_DATATYPE_SFIXED_POINT_4": 0x0304,
    "QNN_DATATYPE_SFIXED_POINT_8": 0x0308, "QNN_DATATYPE_SFIXED_POINT_16": 0x0316,
    "QNN_DATATYPE_UFIXED_POINT_4": 0x0404, "QNN_DATATYPE_UFIXED_POINT_8": 0x0408,
    "QNN_DATATYPE_SFIXED_POINT_32": 0x0332, "QNN_DATATYPE_UFIXED_POINT_16": 0x0416,
    "QNN_DATATYPE_BOOL_8": 0x0508,
}
_PLAIN_DATATYPES = {
    "float32": "QNN_DATATYPE_FLOAT_32", "float16": "QNN_DATATYPE_FLOAT_16", "int64": "QNN_DATATYPE_INT_64",
    "int32": "QNN_DATATYPE_INT_32", "int16": "QNN_DATATYPE_INT_16", "int8": "QNN_DATATYPE_INT_8",
    "uint8": "QNN_DATATYPE_UINT_8", "uint16": "QNN_DATATYPE_UINT_16", "bool": "QNN_DATATYPE_BOOL_8",
}
# Qnn_QuantizationEncoding_t
QNN_QUANT_ENCODINGS = {
    "QNN_QUANTIZATION_ENCODING_SCALE_OFFSET": 0, "QNN_QUANTIZATION_ENCODING_AXIS_SCALE_OFFSET": 1,
    "QNN_QUANTIZATION_ENCODING_BW_SCALE_OFFSET": 2, "QNN_QUANTIZATION_ENCODING_BW_AXIS_SCALE_OFFSET": 3,
    "QNN_QUANTIZATION_ENCODING_BLOCK": 4,
}
QNN_DEFINITION_DEFINED = 1
# Qnn_TensorType_t
_TENSOR_TYPES = {"APP_WRITE": 0, "APP_READ": 1, "NATIVE": 3, "STATIC": 4}

# ONNX op -> qti.aisw op type (QNN's op definitions). Data-invariant shape ops (Shape, Range,
# ConstantOfShape...) have no QNN op: the converter folds them once input shapes are fixed.
QNN_OPS = {
    "Add": "ElementWiseAdd", "Sub": "ElementWiseSubtract", "Mul": "ElementWiseMultiply",
    "Div": "ElementWiseDivide", "Pow": "ElementWisePower", "Sqrt": "ElementWiseSquareRoot",
    "Reciprocal": "ElementWiseDivide", "Neg": "ElementWiseNeg", "Exp": "ElementWiseExp",
    "Log": "ElementWiseLog", "Sin": "ElementWiseSin", "Cos": "ElementWiseCos", "Abs": "ElementWiseAbs",
    "Floor": "ElementWiseFloor", "Ceil": "ElementWiseCeil", "Max": "ElementWiseMaximum",
    "Min": "ElementWiseMinimum", "Equal": "ElementWiseEqual", "Less": "ElementWiseLess",
    "LessOrEqual": "ElementWiseLessEqual", "Greater": "ElementWiseGreater",
    "GreaterOrEqual": "ElementWiseGreaterEqual", "And": "ElementWiseAnd", "Or": "ElementWiseOr",
    "Not": "ElementWiseNot", "Where": "ElementWiseSelect", "Sigmoid": "Sigmoid", "Tanh": "Tanh",
    "Relu": "Relu", "Gelu": "Gelu", "Erf": "ElementWiseErf", "HardSwish": "HardSwish",
    "Clip": "ReluMinMax", "Softmax": "Softmax", "LogSoftmax": "LogSoftmax",
    "LayerNormalization": "LayerNorm", "RMSNormalization": "RmsNorm", "BatchNormalization": "Batchnorm",
    "InstanceNormalization": "InstanceNorm", "MatMul": "MatMul", "Gemm": "FullyConnected",
    "Conv": "Conv2d", "ConvTranspose": "TransposeConv2d", "MaxPool": "PoolMax2d",
    "AveragePool": "PoolAvg2d", "GlobalAveragePool": "PoolAvg2d", "Gather": "Gather",
    "GatherND": "GatherNd", "GatherElements": "GatherElements", "ScatterND": "ScatterNd",
    "Reshape": "Reshape", "Flatten": "Reshape", "Squeeze": "Reshape", "Unsqueeze": "Reshape",
    "Transpose": "Transpose", "Concat": "Concat", "Split": "Split", "Slice": "StridedSlice",
    "Expand": "ElementWiseMultiply", "Tile": "Tile", "Pad": "Pad", "Resize": "Resize",
    "ReduceMean": "ReduceMean", "ReduceSum": "ReduceSum", "ReduceMax": "ReduceMax",
    "ReduceMin": "ReduceMin", "ReduceProd": "ReduceProd", "ArgMax": "Argmax", "ArgMin": "Argmin",
    "TopK": "TopK", "CumSum": "CumulativeSum", "Cast": "Cast", "DepthToSpace": "DepthToSpace",
    "SpaceToDepth": "SpaceToDepth", "PRelu": "Prelu", "LeakyRelu": "Prelu", "Elu": "Elu",
}
_FOLDED_OPS = {"Shape", "Range", "ConstantOfShape", "Size", "Identity", "Constant"}
_WEIGHT_OPS = {"FullyConnected", "Conv2d", "TransposeConv2d", "MatMul"}


# ---------------------------------------------------------------- QDQ <-> float + encodings
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


def _on_type(enc: Encoding, code_type: str | None, shape=None) -> tuple[QuantSpec, np.ndarray, np.ndarray]:
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


# ----------------------------------------------------------------------- schema (1.0.0)
_V1_TOP = {"version", "activation_encodings", "param_encodings", "excluded_layers", "quantizer_args"}
_V1_ENTRY = {"name", "dtype", "enc_type", "bw", "is_sym", "scale", "offset", "block_size", "axis"}


def check_encodings_v1(data) -> list[str]:
    """Problems with an AIMET/QNN 1.0.0 encodings document (empty when it is valid).

    The layout: {"version": "1.0.0", "activation_encodings": [entry], "param_encodings": [entry]}
    with entry = {name, dtype: INT|FLOAT, enc_type: PER_TENSOR|PER_CHANNEL|PER_BLOCK, bw,
    is_sym, scale: [float > 0], offset: [int]} (+ block_size for PER_BLOCK; `axis` is graphopt's
    extension). Names are unique across both lists.
    """
    if not isinstance(data, dict):
        return ["top level: must be an object"]
    problems = [f"top level: unknown key '{k}'" for k in sorted(set(data) - _V1_TOP)]
    if data.get("version") != "1.0.0":
        problems.append(f"version: must be \"1.0.0\", got {data.get('version')!r}")
    seen: set[str] = set()
    for section in ("activation_encodings", "param_encodings"):
        entries = data.get(section)
        if not isinstance(entries, list):
            problems.append(f"{section}: must be a list")
            continue
        for i, entry in enumerate(entries):
            problems += _check_v1_entry(entry, f"{section}[{i}]", seen)
    return problems


def _check_v1_entry(entry, where: str, seen: set[str]) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: must be an object"]
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        return [f"{where}: 'name' must be a non-empty string"]
    where = f"{where} '{name}'"
    problems = [f"{where}: unknown key '{k}'" for k in sorted(set(entry) - _V1_ENTRY)]
    if name in seen:
        problems.append(f"{where}: name appears twice")
    seen.add(name)
    dtype, enc_type, bw = entry.get("dtype"), entry.get("enc_type"), entry.get("bw")
    if dtype not in ("INT", "FLOAT"):
        problems.append(f"{where}: dtype must be INT or FLOAT, got {dtype!r}")
    if enc_type not in ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK"):
        problems.append(f"{where}: enc_type must be PER_TENSOR, PER_CHANNEL or PER_BLOCK, got {enc_type!r}")
    if not isinstance(bw, int) or isinstance(bw, bool) or bw not in (4, 8, 16, 32):
        problems.append(f"{where}: bw must be 4, 8, 16 or 32, got {bw!r}")
    if dtype != "INT":
        return problems
    scale, offset = entry.get("scale"), entry.get("offset")
    if not isinstance(entry.get("is_sym"), bool):
        problems.append(f"{where}: is_sym must be true or false")
    if not isinstance(scale, list) or not scale or not all(isinstance(s, (int, float)) and s > 0 for s in scale):
        problems.append(f"{where}: scale must be a non-empty list of positive numbers")
        return problems
    if not isinstance(offset, list) or len(offset) != len(scale) or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in offset):
        problems.append(f"{where}: offset must be a list of integers, one per scale")
    if enc_type == "PER_TENSOR" and len(scale) != 1:
        problems.append(f"{where}: PER_TENSOR has exactly one scale, got {len(scale)}")
    if enc_type == "PER_BLOCK" and not (isinstance(entry.get("block_size"), int) and entry["block_size"] > 1):
        problems.append(f"{where}: PER_BLOCK needs an integer block_size > 1")
    return problems


# ------------------------------------------------------------------------ model_net.json
class _LastShape:
    """Accumulator for `activations.capture`: the shape and type of the last value seen."""

    def __init__(self):
        self.shape: tuple[int, ...] | None = None
        self.dtype: str | None = None

    def update(self, x: np.ndarray) -> None:
        self.shape, self.dtype = tuple(int(d) for d in x.shape), np.dtype(x.dtype).name


def tensor_shapes(model: Model) -> dict[str, tuple[tuple[int, ...] | None, str | None]]:
    """name -> (dims, numpy dtype) of every tensor, for the model's first sample input.

    ONNX shape inference with the inputs fixed to the sample's shapes gives most dims; the
    rest (data-dependent ones) are measured by running the sample through onnxruntime.
    """
    from graphopt.activations import capture

    proto = model.to_onnx()
    sample = model.sample_inputs[0] if model.sample_inputs else {}
    for inp in proto.graph.input:
        if inp.name in sample:
            dims = inp.type.tensor_type.shape.dim
            for dim, size in zip(dims, sample[inp.name].shape):
                dim.Clear()
                dim.dim_value = int(size)
    del proto.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # inference is an aid; what it cannot do is measured below
        log.debug("qnn: shape inference failed: %s", exc)
        inferred = proto
    found: dict = {}
    for info in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        ttype = info.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name if ttype.elem_type else None
        dims = tuple(d.dim_value for d in ttype.shape.dim) if ttype.HasField("shape") and all(
            d.HasField("dim_value") for d in ttype.shape.dim) else None
        found[info.name] = (dims, dtype)
    for tensor in model.graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            found[tensor.name] = (tuple(tensor.values.shape), np.dtype(tensor.values.dtype).name)
    unknown = [n for n in model.graph.tensors() if n and found.get(n, (None, None))[0] is None]
    if unknown and sample:
        probe = Model.from_onnx(inferred)
        measured = capture(probe.replace(sample_inputs=[sample]), [sample], unknown, lambda _: _LastShape(),
                           progress=False, desc="qnn shapes")
        for name, acc in measured.items():
            found[name] = (acc.shape, acc.dtype)
    return found


def _macs(op: str, node: gs.Node, shapes: dict) -> int:
    """Multiply-accumulates of one run: MatMul/FC = |output| · K, Conv = |output| · Cin/g · |kernel|."""
    out_dims = shapes.get(node.outputs[0].name, (None, None))[0] if node.outputs else None
    if out_dims is None or op not in _WEIGHT_OPS:
        return 0
    in_dims = shapes.get(node.inputs[0].name, (None, None))[0]
    w_dims = shapes.get(node.inputs[1].name, (None, None))[0] if len(node.inputs) > 1 else None
    if in_dims is None or w_dims is None:
        return 0
    if node.op in ("MatMul", "Gemm"):
        k = w_dims[1] if node.op == "Gemm" and node.attrs.get("transB", 0) else w_dims[0] if len(w_dims) < 3 else w_dims[-2]
        return int(np.prod(out_dims)) * int(k)
    if node.op in ("Conv", "ConvTranspose"):
        return int(np.prod(out_dims)) * int(np.prod(w_dims[1:]))
    return 0


def _qnn_op(node: gs.Node) -> str | None:
    """The qti.aisw op for `node`: a MatMul with a 2-D constant weight is a FullyConnected."""
    if node.op == "MatMul" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) \
            and node.inputs[1].values.ndim == 2:
        return "FullyConnected"
    if node.op == "Conv" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}.get(node.inputs[1].values.ndim, "Conv2d")
    return QNN_OPS.get(node.op)


def _fc_weight_names(graph: gs.Graph) -> set[str]:
    return {n.inputs[1].name for n in graph.nodes if _qnn_op(n) == "FullyConnected"}


def _quant_params(enc: Encoding, code_type: str | None, transposed: bool) -> tuple[str, dict]:
    """(QNN datatype name, quant_params) of an encoding on its integer type; offsets on the
    datatype's own grid (QNN: float = (q + offset) · scale), i.e. −zero_point of that type."""
    spec, _, zero_point = _on_type(enc, code_type)
    datatype = f"QNN_DATATYPE_{'S' if spec.signed else 'U'}FIXED_POINT_{enc.bitwidth}"
    offsets = [-int(z) for z in np.ravel(zero_point)]
    pairs = [{"scale": float(s), "offset": o} for s, o in zip(enc.scale, offsets)]
    axis = enc.axis
    if transposed and axis is not None:
        axis = 1 - (axis % 2)  # FullyConnected weights are [out, in]: ONNX's [in, out] transposed
    if enc.enc_type == "PER_TENSOR":
        if enc.bitwidth == 4:
            name = "QNN_QUANTIZATION_ENCODING_BW_SCALE_OFFSET"
            body = {"bw_scale_offset": {"bitwidth": 4, **pairs[0]}}
        else:
            name = "QNN_QUANTIZATION_ENCODING_SCALE_OFFSET"
            body = {"scale_offset": pairs[0]}
    elif enc.enc_type == "PER_CHANNEL":
        if enc.bitwidth == 4:
            name = "QNN_QUANTIZATION_ENCODING_BW_AXIS_SCALE_OFFSET"
            body = {"bw_axis_scale_offset": {"bitwidth": 4, "axis": axis, "num_elements": len(pairs),
                                             "scales": [p["scale"] for p in pairs],
                                             "offsets": [p["offset"] for p in pairs]}}
        else:
            name = "QNN_QUANTIZATION_ENCODING_AXIS_SCALE_OFFSET"
            body = {"axis_scale_offset": {"axis": axis, "num_scale_offsets": len(pairs), "scale_offsets": pairs}}
    else:
        name = "QNN_QUANTIZATION_ENCODING_BLOCK"
        body = {"block_encoding": {"bitwidth": enc.bitwidth, "axis": axis, "block_size": int(enc.block_size),
                                   "num_scale_offsets": len(pairs), "scale_offsets": pairs}}
    return datatype, {"definition": QNN_DEFINITION_DEFINED, "encoding": QNN_QUANT_ENCODINGS[name],
                      "encoding_name": name, **body}


def _datatype_code_type(name: str) -> str | None:
    """QNN_DATATYPE_UFIXED_POINT_8 -> uint8 (None for non-fixed-point types)."""
    for family, prefix in (("UFIXED_POINT_", "uint"), ("SFIXED_POINT_", "int")):
        if family in name:
            return f"{prefix}{name.rsplit('_', 1)[-1]}"
    return None


def net_json(float_model: Model, encodings: Encodings, shapes: dict, code_types: dict[str, str] | None = None) -> dict:
    """A QNN-style graph in the `model_net.json` layout: graph.tensors and graph.nodes by name.

    Tensors carry id, type (APP_WRITE inputs, APP_READ outputs, NATIVE, STATIC), data_type (code
    and name), dims and quant_params; nodes carry package, type (qti.aisw op), input/output
    names and macs_per_inference. FullyConnected weights are listed [out, in] as QNN keeps them.
    """
    graph = float_model.graph
    fc_weights = _fc_weight_names(graph)
    inputs = {t.name for t in graph.inputs}
    outputs = {t.name for t in graph.outputs}
    tensors: dict[str, dict] = {}

    def add_tensor(tensor: gs.Tensor) -> None:
        if not tensor.name or tensor.name in tensors:
            return
        dims, dtype = shapes.get(tensor.name, (None, None))
        kind = ("STATIC" if isinstance(tensor, gs.Constant) else "APP_WRITE" if tensor.name in inputs
                else "APP_READ" if tensor.name in outputs else "NATIVE")
        enc = encodings.get(tensor.name)
        transposed = tensor.name in fc_weights
        entry = {"id": len(tensors) + 1, "type": _TENSOR_TYPES[kind], "tensor_type": f"QNN_TENSOR_TYPE_{kind}",
                 "dataFormat": 0}
        if enc is not None and enc.dtype == "int":
            datatype, quant = _quant_params(enc, (code_types or {}).get(tensor.name), transposed)
        elif (code_types or {}).get(tensor.name) == "int32":
            # a quantized bias: QNN derives its scale (s_x·s_w) and offset 0 from its operands
            datatype, quant = "QNN_DATATYPE_SFIXED_POINT_32", {"definition": 0x7FFFFFFF, "encoding": 0}
        else:
            datatype, quant = _PLAIN_DATATYPES.get(dtype or "float32", "QNN_DATATYPE_FLOAT_32"), {
                "definition": 0, "encoding": QNN_QUANT_ENCODINGS["QNN_QUANTIZATION_ENCODING_SCALE_OFFSET"],
                "scale_offset": {"scale": 0.0, "offset": 0}}
        if transposed and dims is not None:
            dims = (dims[1], dims[0])
            entry["permute_order_to_src"] = [1, 0]
        entry.update(data_type=QNN_DATATYPES[datatype], data_type_name=datatype,
                     dims=list(dims) if dims is not None else None, quant_params=quant)
        tensors[tensor.name] = entry

    for tensor in graph.inputs:
        add_tensor(tensor)
    nodes = {}
    op_types: Counter = Counter()
    for index, node in enumerate(graph.nodes):
        for tensor in list(node.inputs) + list(node.outputs):
            add_tensor(tensor)
        op = _qnn_op(node)
        name = node.name or f"{node.op}_{index}"
        op_types[op or node.op] += 1
        nodes[name] = {
            "package": "qti.aisw" if op else "unsupported", "type": op or node.op, "onnx_op": node.op,
            "tensor_params": {}, "scalar_params": _scalar_params(node),
            "input_names": [t.name for t in node.inputs if t.name],
            "output_names": [t.name for t in node.outputs if t.name],
            "macs_per_inference": _macs(op or "", node, shapes),
        }
    return {"model.cpp": "", "model.bin": "", "converter_command": "graphopt qnn backend", "copyright_str": "",
            "op_types": sorted(op_types), "graph": {"tensors": tensors, "nodes": nodes}}


def _scalar_params(node: gs.Node) -> dict:
    """Plain scalar attributes (axis, epsilon, transB...) as QNN scalar params."""
    out = {}
    for key, value in node.attrs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        out[key] = value
    return out


# --------------------------------------------------------------------- HTP compatibility
def htp_compatibility(float_model: Model, encodings: Encodings, net: dict) -> list[dict]:
    """What QNN's HTP backend would reject (severity "reject") or run off the fast path ("warn").

    Rules: dynamic input shapes; ops with no qti.aisw op; per-channel weights of a MatMul that is
    not a FullyConnected (HTP quantizes MatMul's second input per tensor) or per-channel along an
    FC's input axis; 16-bit weights on FullyConnected/Conv/MatMul (HTP wants 8- or 4-bit); 4-bit
    anywhere but those weights; per-block encodings anywhere but 4-bit FC/Conv weights;
    quantized tensors read by a Gather as its table per channel; float tensors in a quantized graph.
    """
    findings = []
    graph = float_model.graph
    for tensor in graph.inputs:
        dynamic = [d for d in (tensor.shape or []) if not isinstance(d, (int, np.integer)) or d < 0]
        if dynamic or tensor.shape is None:
            findings.append(_finding("reject", "dynamic_shape", tensor=tensor.name,
                                     message=f"input '{tensor.name}' has dynamic dims {dynamic or '?'}; HTP graphs "
                                             "are static: fix them (onnxruntime.tools.make_dynamic_shape_fixed)"))
    weight_readers: dict[str, list[tuple[str, str, int]]] = {}
    for name, entry in net["graph"]["nodes"].items():
        if entry["package"] != "qti.aisw" and entry["onnx_op"] not in _FOLDED_OPS:
            findings.append(_finding("reject", "unsupported_op", node=name,
                                     message=f"{entry['onnx_op']} '{name}' has no qti.aisw op"))
        elif entry["package"] != "qti.aisw":
            findings.append(_finding("warn", "needs_static_shapes", node=name,
                                     message=f"{entry['onnx_op']} '{name}' must fold away (static shapes) before QNN"))
        for position, tensor in enumerate(entry["input_names"]):
            weight_readers.setdefault(tensor, []).append((name, entry["type"], position))
    for name, enc in encodings.params.items():
        if enc.dtype != "int":
            continue
        readers = weight_readers.get(name, [])
        for node, op, position in readers:
            findings += _weight_findings(name, enc, node, op, position, graph)
    for name, enc in encodings.activations.items():
        if enc.dtype == "int" and enc.bitwidth == 4:
            findings.append(_finding("reject", "int4_activation", tensor=name,
                                     message=f"activation '{name}' is 4-bit; HTP activations are 8- or 16-bit"))
        if enc.enc_type != "PER_TENSOR":
            findings.append(_finding("reject", "per_channel_activation", tensor=name,
                                     message=f"activation '{name}' is {enc.enc_type}; HTP activations are per tensor"))
    if len(encodings):
        floats = [n for n, t in net["graph"]["tensors"].items()
                  if t["data_type_name"] == "QNN_DATATYPE_FLOAT_32" and t["type"] != _TENSOR_TYPES["STATIC"]]
        if floats:
            findings.append(_finding("warn", "float_tensors", tensor=floats[0],
                                     message=f"{len(floats)} float tensors (e.g. '{floats[0]}') in a quantized graph "
                                             "run in FP16 on HTP v73+ or need encodings from the converter"))
    return findings


def _weight_findings(name: str, enc: Encoding, node: str, op: str, position: int, graph: gs.Graph) -> list[dict]:
    found = []
    where = f"weight '{name}' of {op} '{node}'"
    if op == "MatMul" and position == 1 and enc.enc_type != "PER_TENSOR":
        found.append(_finding("reject", "per_channel_matmul", node=node, tensor=name,
                              message=f"{where} is {enc.enc_type}; HTP quantizes MatMul's second input per tensor"))
    if op == "FullyConnected" and enc.enc_type == "PER_CHANNEL" and (enc.axis or 0) % 2 == 0:
        found.append(_finding("reject", "per_channel_input_axis", node=node, tensor=name,
                              message=f"{where} has channel scales along its input axis; HTP wants them per output"))
    if op in _WEIGHT_OPS | {"Conv1d", "Conv3d"} and enc.bitwidth == 16:
        found.append(_finding("reject", "weight_16bit", node=node, tensor=name,
                              message=f"{where} is 16-bit; HTP needs 8-bit (or 4-bit) weights here"))
    if enc.bitwidth == 4 and op not in ("FullyConnected", "Conv2d", "Conv1d"):
        found.append(_finding("reject", "int4_not_allowed", node=node, tensor=name,
                              message=f"{where} is 4-bit; HTP takes 4-bit only as FullyConnected/Conv weights"))
    if enc.enc_type == "PER_BLOCK" and (op not in ("FullyConnected", "Conv2d") or enc.bitwidth != 4):
        found.append(_finding("reject", "block_not_allowed", node=node, tensor=name,
                              message=f"{where} is PER_BLOCK {enc.bitwidth}-bit; HTP takes blocks only as 4-bit "
                                      "FullyConnected/Conv weights"))
    if op == "Gather" and position == 0 and enc.enc_type != "PER_TENSOR":
        found.append(_finding("warn", "per_channel_gather", node=node, tensor=name,
                              message=f"{where} is a {enc.enc_type} table; HTP gathers per-tensor data, the "
                                      "converter will requantize the gathered rows"))
    return found


def _finding(severity: str, rule: str, *, message: str, node: str | None = None, tensor: str | None = None) -> dict:
    return {"severity": severity, "rule": rule, "node": node, "tensor": tensor, "message": message}


def _compat_markdown(model_name: str, findings: list[dict]) -> str:
    counts = Counter(f["severity"] for f in findings)
    lines = [f"# QNN HTP compatibility: {model_name}", "",
             f"- rejects: {counts['reject']}, warnings: {counts['warn']}", "",
             "| severity | rule | node | tensor | message |", "|---|---|---|---|---|"]
    lines += [f"| {f['severity']} | {f['rule']} | {f['node'] or ''} | {f['tensor'] or ''} | {f['message']} |"
              for f in findings]
    return "\n".join(lines) + "\n"


def load_package(folder: Path) -> tuple[Model, Encodings, dict[str, str], bool]:
    """What `rebuild_qdq` needs, read from a package's files alone: the float model, its
    encodings, each quantized tensor's integer type and whether biases are quantized (both from
    the QNN datatypes in model_net.json)."""
    folder = Path(folder)
    float_model = Model.from_onnx(load_onnx(folder / "model.onnx"), name=f"{folder.name}-float")
    encodings = Encodings.read(folder / "model.encodings")
    net = json.loads((folder / "model_net.json").read_text())
    code_types, biases = {}, False
    for name, tensor in net["graph"]["tensors"].items():
        kind = _datatype_code_type(tensor.get("data_type_name", ""))
        if name in encodings and kind:
            code_types[name] = kind
        biases = biases or (kind == "int32" and name not in encodings)
    return float_model, encodings, code_types, biases


# ---------------------------------------------------------------------------- backend
@register_backend
@dataclass(frozen=True)
class Qnn(Backend):
    """QNN package: `model.onnx` (float), `model.encodings`, `model_net.json`, `htp_compatibility.{json,md}`.

    Reads the ONNX form with QDQ nodes (graphopt's quantize pass or onnxruntime's quantize_static).
    1. `model.onnx`: QDQ removed, weights dequantized to float exactly, tensor names unchanged.
    2. `model.encodings`: AIMET/QNN encodings (1.0.0, or 0.6.1 with `encodings_version`), one
       entry per quantized tensor (params: weights; activations), checked against the 1.0.0 layout.
    3. `model_net.json`: the graph in QNN terms (qti.aisw ops, datatypes, quant params, dims, MACs).
    4. `htp_compatibility.json` / `.md`: what HTP would reject; `fail_on_reject` makes those fatal.
    Validation rebuilds a QDQ model from the package alone (`load_package`: files 1 and 2, plus the
    QNN datatypes of file 3) and requires its outputs on the sample inputs (`validation_feeds`) to
    equal the QDQ model's exactly, and every quantized tensor to have an entry.
    """

    name: ClassVar[str] = "qnn"
    encodings_version: Literal["1.0.0", "0.6.1"] = field(
        default="1.0.0", metadata={"help": "AIMET/QNN encodings layout (0.6.1 has no per-block)"})
    fail_on_reject: bool = field(default=False, metadata={"help": "fail the export when HTP would reject the graph"})

    def emit(self, model: Model, out_dir: Path) -> Artifact:
        model.require("onnx", f"backend '{self.name}'")
        out_dir = Path(out_dir)
        float_model, encodings, code_types = strip_qdq(model)
        data = encodings.to_json(self.encodings_version)
        problems = check_encodings_v1(encodings.to_json("1.0.0"))
        if problems:
            raise BackendError(f"backend '{self.name}': encodings of '{model.name}' break the 1.0.0 layout: {problems[0]}")
        shapes = tensor_shapes(float_model)
        net = net_json(float_model, encodings, shapes, code_types)
        findings = htp_compatibility(float_model, encodings, net)
        rejects = [f for f in findings if f["severity"] == "reject"]
        if rejects and self.fail_on_reject:
            raise BackendError(f"backend '{self.name}': HTP would reject '{model.name}' ({len(rejects)} problems), "
                               f"first: {rejects[0]['message']}")
        macs = sum(n["macs_per_inference"] for n in net["graph"]["nodes"].values())
        report = {
            "model": model.name, "encodings_version": self.encodings_version,
            "encodings": {"activations": len(encodings.activations), "params": len(encodings.params)},
            "bitwidths": dict(Counter(f"{'w' if n in encodings.params else 'a'}{encodings[n].bitwidth}"
                                      for n in encodings)),
            "nodes": len(net["graph"]["nodes"]), "tensors": len(net["graph"]["tensors"]),
            "qnn_ops": dict(Counter(n["type"] for n in net["graph"]["nodes"].values())),
            "macs_per_inference": macs,
            "htp": {"rejects": len(rejects), "warnings": len(findings) - len(rejects),
                    "rules": dict(Counter(f["rule"] for f in findings))},
        }
        names = ["model.onnx", "model.encodings", "model_net.json", "htp_compatibility.json",
                 "htp_compatibility.md", "qnn_package.json"]
        inputs = [model.source] if model.source else []
        with staged_folder(out_dir, inputs=inputs) as staging:
            save_onnx(float_model.to_onnx(), staging / "model.onnx")
            atomic_write_text(staging / "model.encodings", json.dumps(data, indent=1) + "\n")
            atomic_write_text(staging / "model_net.json", json.dumps(net, indent=1))
            atomic_write_text(staging / "htp_compatibility.json", json.dumps(findings, indent=1))
            atomic_write_text(staging / "htp_compatibility.md", _compat_markdown(model.name, findings))
            atomic_write_text(staging / "qnn_package.json", json.dumps(report, indent=1))
            if (staging / "model.onnx.data").exists():
                names.insert(1, "model.onnx.data")
        return Artifact(backend=self.name, out_dir=out_dir, files=[out_dir / n for n in names], report=report)

    def validate(self, artifact: Artifact, model: Model) -> dict:
        feeds_list, feeds_source = validation_feeds(model)
        folder = artifact.out_dir
        data = json.loads((folder / "model.encodings").read_text())
        if data.get("version") == "1.0.0":
            problems = check_encodings_v1(data)
            if problems:
                raise BackendError(f"{folder / 'model.encodings'}: not valid 1.0.0: {problems[0]}")
        float_model, encodings, code_types, biases = load_package(folder)
        expected = strip_qdq(model)[1]
        missing = [n for n in expected if n not in encodings]
        if missing:
            raise BackendError(f"{folder / 'model.encodings'}: quantized tensor '{missing[0]}' has no entry "
                               f"({len(missing)} missing)")
        rebuilt = rebuild_qdq(float_model, encodings, code_types, quantize_bias=biases)
        original, again = model.session(), rebuilt.session()
        for name, a, b in paired_outputs(original, again, feeds_list, [o.name for o in model.outputs]):
            if a.shape != b.shape or not np.array_equal(a, b):
                diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
                raise BackendError(f"{folder}: the QDQ model rebuilt from the package differs from "
                                   f"'{model.name}' on output '{name}' (max |diff| {diff:.3g})")
        return {"batches": len(feeds_list), "feeds": feeds_source, "identical": True, "entries": len(encodings), "quantized_tensors": len(expected),
                "rebuilt_qdq_nodes": sum(1 for n in rebuilt.graph.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")),
                "passed": True, "max_abs_diff": 0.0}
