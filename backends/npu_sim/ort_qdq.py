"""A QDQ model from onnxruntime's `quantize_static`, the stand-in input for npu-sim tests and benches.

Per-channel int8 weights, int8 asymmetric activations. Attention masks stay float: the Add of a
0 / -inf mask, the Where that builds it and the Softmax after it are excluded, because a
calibrated int8 range over -3.4e38 would flatten every attention score to one value. RMSNorm's
variance (+eps) and its x * rsqrt stay float too: SmolLM2's first token has a variance of ~6e5,
so one per-tensor int8 grid rounds every other token's variance to 0 and rsqrt to inf.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from graphopt.ir import Model

__all__ = ["ort_qdq"]

OP_TYPES = ["MatMul", "Add", "Mul", "Sigmoid", "Softmax", "Transpose", "Reshape", "Concat", "Slice", "Unsqueeze",
            "Squeeze", "Expand", "Where", "LayerNormalization", "Gelu"]


def _float_nodes(proto: onnx.ModelProto) -> list[str]:
    """Nodes left in float: attention-mask Add/Where + Softmax, and the RMSNorm statistics."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    excluded = []
    for node in proto.graph.node:
        sources = {producer[i].op_type for i in node.input if i in producer}
        if node.op_type in ("Add", "Mul") and sources & {"ReduceMean", "Reciprocal"}:
            excluded.append(node.name)
            continue
        if node.op_type != "Softmax":
            continue
        excluded.append(node.name)
        add = producer.get(node.input[0])
        if add is not None and add.op_type == "Add":
            excluded.append(add.name)
            excluded += [producer[i].name for i in add.input if i in producer and producer[i].op_type == "Where"]
    return excluded


def ort_qdq(model: Model, calib: list[dict[str, np.ndarray]], *, op_types: list[str] | None = None) -> Model:
    """`model` (ONNX form) quantized by onnxruntime.quantization.quantize_static in QDQ format."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calib)

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(prefix="npu-sim-qdq-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "qdq.onnx"
        model.replace(source=None).save(src)
        large = (Path(tmp) / "fp32.onnx.data").exists()
        proto = onnx.load(str(src), load_external_data=False)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=op_types or OP_TYPES, nodes_to_exclude=_float_nodes(proto),
                        use_external_data_format=large,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        quantized = onnx.load(str(dst))
    out = Model.from_onnx(quantized, name=f"{model.name}-qdq", task=model.task, tokenizer=model.tokenizer,
                          sample_inputs=model.sample_inputs)
    return out
