"""qnn: the package Qualcomm's converter consumes: float ONNX, AIMET/QNN encodings, model_net.json, HTP report.

A decoder's package holds each of its graphs (portable form: prefill.onnx and decode.onnx over one
weights file) with one encodings file: the decode graph's encodings must be exactly the prefill
graph's, or the export fails naming the first tensor that differs.
"""

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
from graphopt.pipeline import backends as contract
from graphopt.pipeline.backends import Artifact, Backend, paired_outputs, register_backend, validation_feeds
from graphopt.quant.encodings import Encodings

__all__ = [
    "Qnn", "QNN_OPS", "QNN_DATATYPES", "strip_qdq", "rebuild_qdq", "load_package", "check_encodings_v1",
    "htp_compatibility", "net_json",
]

log = logging.getLogger(__name__)

MAX_NET_BYTES = 1 << 30  # model_net.json / model.encodings of a package: a few MB for a 135M model


def load_package(folder: Path, stem: str = "model") -> tuple[Model, Encodings, dict[str, str], bool]:
    """What `rebuild_qdq` needs, read from a package's files alone: the float model (`STEM.onnx`),
    the encodings (`model.encodings`, shared by a decoder's graphs), each quantized tensor's
    integer type and whether biases are quantized (both from the QNN datatypes in `STEM_net.json`)."""
    folder = Path(folder)
    float_model = Model.from_onnx(load_onnx(folder / f"{stem}.onnx"), name=f"{folder.name}-{stem}-float")
    encodings = Encodings.read(folder / "model.encodings")
    net_file = f"{stem}_net.json"
    net = read_json(folder / net_file, max_bytes=MAX_NET_BYTES, error=BackendError, what="QNN graph file")
    tensors = want_dict(want_dict(want_dict(net, net_file, BackendError).get("graph"), f"{net_file} 'graph'",
                                  BackendError).get("tensors"), f"{net_file} 'graph.tensors'", BackendError)
    code_types, biases = {}, False
    for name, tensor in tensors.items():
        tensor = want_dict(tensor, f"{folder / net_file}: tensor {name!r}", BackendError)
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

    def _graph_package(self, model: Model) -> dict:
        """One graph's part of the package: float model, encodings, code types, QNN graph, HTP findings, report."""
        float_model, encodings, code_types = strip_qdq(model)
        problems = check_encodings_v1(encodings.to_json("1.0.0"))
        if problems:
            raise BackendError(f"backend '{self.name}': encodings of '{model.name}' break the 1.0.0 layout: {problems[0]}")
        net = net_json(float_model, encodings, tensor_shapes(float_model), code_types)
        findings = htp_compatibility(float_model, encodings, net)
        rejects = [f for f in findings if f["severity"] == "reject"]
        if rejects and self.fail_on_reject:
            raise BackendError(f"backend '{self.name}': HTP would reject '{model.name}' ({len(rejects)} problems), "
                               f"first: {rejects[0]['message']}")
        report = {
            "model": model.name, "encodings_version": self.encodings_version,
            "encodings": {"activations": len(encodings.activations), "params": len(encodings.params)},
            "bitwidths": dict(Counter(f"{'w' if n in encodings.params else 'a'}{encodings[n].bitwidth}"
                                      for n in encodings)),
            "nodes": len(net["graph"]["nodes"]), "tensors": len(net["graph"]["tensors"]),
            "qnn_ops": dict(Counter(n["type"] for n in net["graph"]["nodes"].values())),
            "macs_per_inference": sum(n["macs_per_inference"] for n in net["graph"]["nodes"].values()),
            "htp": {"rejects": len(rejects), "warnings": len(findings) - len(rejects),
                    "rules": dict(Counter(f["rule"] for f in findings))},
        }
        return {"float": float_model, "encodings": encodings, "net": net, "findings": findings, "report": report}

    def emit(self, model: Model, out_dir: Path, *, force: bool = False) -> Artifact:
        model.require("onnx", f"backend '{self.name}'")
        out_dir = Path(out_dir)
        graphs = contract.decoder_graphs(model)
        if graphs is None:
            parts = {"model.onnx": self._graph_package(model)}
        else:
            contract.require_portable(graphs.spec, self.name, model.name)
            parts = {f: self._graph_package(graphs.model(f, f"{model.name}/{f}")) for f in graphs.graphs}
        encodings = _shared_encodings(model.name, parts)
        report = next(iter(parts.values()))["report"] if graphs is None else {
            "model": model.name, "encodings_version": self.encodings_version,
            "encodings": {"activations": len(encodings.activations), "params": len(encodings.params)},
            "graphs": {f: part["report"] for f, part in parts.items()}}
        inputs = [model.source] if model.source else []
        with OutputSet(out_dir, inputs=inputs, force=force) as out:
            staging = out.staging
            names = self._write_graphs(staging, graphs, parts)
            write_json(staging / "model.encodings", encodings.to_json(self.encodings_version))
            names.append("model.encodings")
            for file, part in parts.items():
                stem, prefix = Path(file).stem, "" if len(parts) == 1 else f"{Path(file).stem}."
                write_json(staging / f"{stem}_net.json", part["net"])
                write_json(staging / f"{prefix}htp_compatibility.json", part["findings"])
                atomic_write_text(staging / f"{prefix}htp_compatibility.md",
                                  compat_markdown(part["report"]["model"], part["findings"]))
                names += [f"{stem}_net.json", f"{prefix}htp_compatibility.json", f"{prefix}htp_compatibility.md"]
            write_json(staging / "qnn_package.json", report)
            names.append("qnn_package.json")
        return Artifact(backend=self.name, out_dir=out_dir, files=[out_dir / n for n in names], report=report)

    @staticmethod
    def _write_graphs(staging: Path, graphs, parts: dict) -> list[str]:
        """The float graphs; a decoder's share one weights file (each weight once), as in a decoder folder."""
        if graphs is None:
            written = parts["model.onnx"]["float"].write(staging / "model.onnx")
            return [p.name for p in written]
        from graphopt.lowering.decoder import DecoderGraphs

        weights: dict[str, np.ndarray] = {}
        protos = {f: part["float"].to_onnx(externals=weights) for f, part in parts.items()}
        written = [p.name for p in DecoderGraphs(graphs.spec, protos, weights).write(staging)]
        return sorted(written, key=lambda name: not name.endswith(".onnx"))  # the graphs first

    def validate(self, artifact: Artifact, model: Model) -> dict:
        folder = artifact.out_dir
        data = read_json(folder / "model.encodings", max_bytes=MAX_NET_BYTES, error=BackendError,
                         what="encodings file")
        if isinstance(data, dict) and data.get("version") == "1.0.0":
            problems = check_encodings_v1(data)
            if problems:
                raise BackendError(f"{folder / 'model.encodings'}: not valid 1.0.0: {problems[0]}")
        graphs = contract.decoder_graphs(model)
        files = list(graphs.graphs) if graphs else ["model.onnx"]
        rebuilt, entries, expected = {}, 0, 0
        for file in files:
            float_model, encodings, code_types, biases = load_package(folder, Path(file).stem)
            needed = strip_qdq(graphs.model(file) if graphs else model)[1]
            missing = [n for n in needed if n not in encodings]
            if missing:
                raise BackendError(f"{folder / 'model.encodings'}: quantized tensor '{missing[0]}' of {file} has no "
                                   f"entry ({len(missing)} missing)")
            rebuilt[file] = rebuild_qdq(float_model, encodings, code_types, quantize_bias=biases)
            entries, expected = len(encodings), max(expected, len(needed))
        qdq_nodes = sum(1 for m in rebuilt.values() for n in m.graph.nodes
                        if n.op in ("QuantizeLinear", "DequantizeLinear"))
        found = {"identical": True, "entries": entries, "quantized_tensors": expected, "rebuilt_qdq_nodes": qdq_nodes,
                 "passed": True, "max_abs_diff": 0.0}
        if graphs:
            sessions = {file: m.session() for file, m in rebuilt.items()}
            pairs = contract.decoder_steps(graphs.spec, graphs.sessions(), sessions, model)
            _require_identical(folder, model.name, pairs, "step")
            return {"graphs": files, "steps": [step for step, _, _ in pairs], **found}
        feeds_list, feeds_source = validation_feeds(model)
        pairs = paired_outputs(model.session(), rebuilt["model.onnx"].session(), feeds_list,
                               [o.name for o in model.outputs])
        _require_identical(folder, model.name, pairs, "output")
        return {"batches": len(feeds_list), "feeds": feeds_source, **found}


def _shared_encodings(name: str, parts: dict) -> Encodings:
    """The one encodings set of all graphs: each graph's must equal the first's (a decoder's decode
    graph uses exactly its prefill graph's)."""
    (first, part), *others = parts.items()
    encodings = part["encodings"]
    for file, other in others:
        theirs = other["encodings"]
        if theirs == encodings:
            continue
        names = sorted(set(encodings) ^ set(theirs)) or sorted(n for n in encodings if encodings[n] != theirs[n])
        raise BackendError(f"backend 'qnn': '{name}': {file} and {first} differ in the encoding of tensor "
                           f"'{names[0]}'; a decoder's graphs must share one encodings set (quantize the decoder "
                           "Model once, before it is split into graphs)")
    return encodings


def _require_identical(folder: Path, name: str, pairs, what: str) -> None:
    for label, a, b in pairs:
        if a.shape != b.shape or not np.array_equal(a, b):
            diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
            raise BackendError(f"{folder}: the QDQ model rebuilt from the package differs from "
                               f"'{name}' on {what} '{label}' (max |diff| {diff:.3g})")
