"""What QNN's HTP backend would reject or run off its fast path, as findings and Markdown."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.backends.qnn.tables import FOLDED_OPS, TENSOR_TYPES, WEIGHT_OPS
from graphopt.ir import Model
from graphopt.quant.encodings import Encoding, Encodings


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
        if entry["package"] != "qti.aisw" and entry["onnx_op"] not in FOLDED_OPS:
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
                  if t["data_type_name"] == "QNN_DATATYPE_FLOAT_32" and t["type"] != TENSOR_TYPES["STATIC"]]
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
    if op in WEIGHT_OPS | {"Conv1d", "Conv3d"} and enc.bitwidth == 16:
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


def compat_markdown(model_name: str, findings: list[dict]) -> str:
    counts = Counter(f["severity"] for f in findings)
    lines = [f"# QNN HTP compatibility: {model_name}", "",
             f"- rejects: {counts['reject']}, warnings: {counts['warn']}", "",
             "| severity | rule | node | tensor | message |", "|---|---|---|---|---|"]
    lines += [f"| {f['severity']} | {f['rule']} | {f['node'] or ''} | {f['tensor'] or ''} | {f['message']} |"
              for f in findings]
    return "\n".join(lines) + "\n"
