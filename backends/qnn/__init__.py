"""qnn: the package Qualcomm's converter consumes: float ONNX, AIMET/QNN encodings, model_net.json, HTP report."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from graphopt.backends.qnn.htp import compat_markdown, htp_compatibility
from graphopt.backends.qnn.net import datatype_code_type, net_json, tensor_shapes
from graphopt.backends.qnn.qdq import rebuild_qdq, strip_qdq
from graphopt.backends.qnn.schema import check_encodings_v1
from graphopt.backends.qnn.tables import QNN_DATATYPES, QNN_OPS
from graphopt.errors import BackendError
from graphopt.files.json_files import write_json
from graphopt.files.reading import read_json, want_dict
from graphopt.files.writing import OutputSet, atomic_write_text
from graphopt.ir import Model
from graphopt.ir.onnx_files import load_onnx
from graphopt.pipeline.backends import Artifact, Backend, paired_outputs, register_backend, validation_feeds
from graphopt.quant.encodings import Encodings

__all__ = [
    "Qnn", "QNN_OPS", "QNN_DATATYPES", "strip_qdq", "rebuild_qdq", "load_package", "check_encodings_v1",
    "htp_compatibility", "net_json",
]

log = logging.getLogger(__name__)

MAX_NET_BYTES = 1 << 30  # model_net.json / model.encodings of a package: a few MB for a 135M model


def load_package(folder: Path) -> tuple[Model, Encodings, dict[str, str], bool]:
    """What `rebuild_qdq` needs, read from a package's files alone: the float model, its
    encodings, each quantized tensor's integer type and whether biases are quantized (both from
    the QNN datatypes in model_net.json)."""
    folder = Path(folder)
    float_model = Model.from_onnx(load_onnx(folder / "model.onnx"), name=f"{folder.name}-float")
    encodings = Encodings.read(folder / "model.encodings")
    net = read_json(folder / "model_net.json", max_bytes=MAX_NET_BYTES, error=BackendError, what="QNN graph file")
    tensors = want_dict(want_dict(want_dict(net, "model_net.json", BackendError).get("graph"), "model_net.json 'graph'",
                                  BackendError).get("tensors"), "model_net.json 'graph.tensors'", BackendError)
    code_types, biases = {}, False
    for name, tensor in tensors.items():
        tensor = want_dict(tensor, f"{folder / 'model_net.json'}: tensor {name!r}", BackendError)
        kind = datatype_code_type(str(tensor.get("data_type_name", "")))
        if name in encodings and kind:
            code_types[name] = kind
        biases = biases or (kind == "int32" and name not in encodings)
    return float_model, encodings, code_types, biases


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

    def emit(self, model: Model, out_dir: Path, *, force: bool = False) -> Artifact:
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
        with OutputSet(out_dir, inputs=inputs, force=force) as out:
            staging = out.staging
            float_model.write(staging / "model.onnx")
            write_json(staging / "model.encodings", data)
            write_json(staging / "model_net.json", net)
            write_json(staging / "htp_compatibility.json", findings)
            atomic_write_text(staging / "htp_compatibility.md", compat_markdown(model.name, findings))
            write_json(staging / "qnn_package.json", report)
            if (staging / "model.onnx.data").exists():
                names.insert(1, "model.onnx.data")
        return Artifact(backend=self.name, out_dir=out_dir, files=[out_dir / n for n in names], report=report)

    def validate(self, artifact: Artifact, model: Model) -> dict:
        feeds_list, feeds_source = validation_feeds(model)
        folder = artifact.out_dir
        data = read_json(folder / "model.encodings", max_bytes=MAX_NET_BYTES, error=BackendError,
                         what="encodings file")
        if isinstance(data, dict) and data.get("version") == "1.0.0":
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
