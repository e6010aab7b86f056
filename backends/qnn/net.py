"""model_net.json: the QNN-style graph (qti.aisw ops, QNN datatypes, quant params, dims, MACs)."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.backends.qnn.qdq import on_type
from graphopt.backends.qnn.tables import (
    PLAIN_DATATYPES,
    QNN_DATATYPES,
    QNN_DEFINITION_DEFINED,
    QNN_OPS,
    QNN_QUANT_ENCODINGS,
    TENSOR_TYPES,
    WEIGHT_OPS,
)
from graphopt.ir import Model
from graphopt.quant.encodings import Encoding, Encodings

log = logging.getLogger(__name__)


class _LastShape:
    """Accumulator for `graphopt.analysis.capture`: the shape and type of the last value seen."""

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
    from graphopt.analysis.capture import capture

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
    if out_dims is None or op not in WEIGHT_OPS:
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
    spec, _, zero_point = on_type(enc, code_type)
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


def datatype_code_type(name: str) -> str | None:
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
        entry = {"id": len(tensors) + 1, "type": TENSOR_TYPES[kind], "tensor_type": f"QNN_TENSOR_TYPE_{kind}",
                 "dataFormat": 0}
        if enc is not None and enc.dtype == "int":
            datatype, quant = _quant_params(enc, (code_types or {}).get(tensor.name), transposed)
        elif (code_types or {}).get(tensor.name) == "int32":
            # a quantized bias: QNN derives its scale (s_x·s_w) and offset 0 from its operands
            datatype, quant = "QNN_DATATYPE_SFIXED_POINT_32", {"definition": 0x7FFFFFFF, "encoding": 0}
        else:
            datatype, quant = PLAIN_DATATYPES.get(dtype or "float32", "QNN_DATATYPE_FLOAT_32"), {
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
