"""ort-mobile: ORT-format models, one reduced-build operator config, and a mobile usability report.

A decoder's graphs (portable form: prefill and decode; ort form: its one graph) are converted
together: one `.ort` per graph and one operator config covering all of them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from graphopt.errors import BackendError
from graphopt.files.writing import OutputSet, atomic_write_text
from graphopt.ir import Model
from graphopt.pipeline.backends import (
    Artifact,
    Backend,
    decoder_graphs,
    decoder_steps,
    paired_outputs,
    register_backend,
    validation_feeds,
)

__all__ = ["OrtMobile", "XNNPACK_OPS"]

log = logging.getLogger(__name__)

# The XNNPACK EP's kernels (onnxruntime/core/providers/xnnpack): onnxruntime's usability checker
# covers NNAPI and CoreML only, so this table stands in for XNNPACK. QDQ node units around these
# ops are taken with them; other ops stay on the CPU EP.
XNNPACK_OPS = {
    "ai.onnx": ["AveragePool", "Conv", "ConvTranspose", "Gemm", "MatMul", "MaxPool", "QLinearConv",
                "Resize", "Softmax", "DequantizeLinear", "QuantizeLinear"],
    "com.microsoft": ["QLinearAveragePool", "QLinearConvTranspose", "QLinearSoftmax"],
}
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _ort_file_names(style: str, stems: list[str]) -> tuple[list[str], str]:
    """The names onnxruntime's converter gives the `.ort` of each `STEM.onnx` of a folder, and the
    folder's operator config, for an optimization style."""
    suffix = ".with_runtime_opt" if style == "runtime" else ""
    return [f"{stem}{suffix}.ort" for stem in stems], f"required_operators{suffix}.config"


def _supported_ops_table(ops: dict[str, list[str]]) -> str:
    """A Markdown table in the layout onnxruntime's usability checker reads (domain:op | caveat)."""
    rows = ["|Operator|Note|", "|--------|------|"]
    rows += [f"|{domain}:{op}||" for domain, names in ops.items() for op in names]
    return "\n".join(rows) + "\n"


def _ep_checkers(tables: Path) -> dict:
    """EP name -> function(model_proto, require_fixed_input_sizes) -> PartitioningInfo."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    xnnpack_table = tables / "xnnpack_supported_ops.md"
    xnnpack_table.write_text(_supported_ops_table(XNNPACK_OPS))
    return {
        "NNAPI": uc.check_nnapi_partitions,
        "CoreML NeuralNetwork": lambda m, fixed: uc.check_coreml_partitions(m, fixed, "coreml_supported_neuralnetwork_ops.md"),
        "CoreML MLProgram": lambda m, fixed: uc.check_coreml_partitions(m, fixed, "coreml_supported_mlprogram_ops.md"),
        # the checker has no public entry point for an op table of our own
        "XNNPACK": lambda m, fixed: uc._check_ep_partitioning(m, xnnpack_table, fixed),
    }


def _partition_json(info) -> dict:
    return {
        "nodes": info.num_nodes,
        "supported_nodes": info.num_supported_nodes,
        "partitions": info.num_partitions,
        "partition_sizes": [len(group) for group in info.supported_groups],
        "unsupported_ops": sorted(info.unsupported_ops),
        "unsupported_due_to_op": info.nodes_unsupported_due_to_op,
        "unsupported_due_to_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
        "unsupported_due_to_rank": info.num_unsupported_nodes_due_to_rank,
        "suitability": info.suitability().name,
        "caveats": info.supported_ops_checker.get_caveats(),
    }


def usability_report(onnx_path: Path, work: Path, model_name: str) -> tuple[dict, str]:
    """Which mobile EPs would take which nodes of the model at `onnx_path`: (JSON, text).

    Mirrors `python -m onnxruntime.tools.check_onnx_model_mobile_usability`: the model is first
    optimized at the basic level (as the ORT-format conversion does), shapes are inferred, and
    each EP's op table is checked with the shapes as they are and as if they were fixed. The text
    is onnxruntime's own analysis log; the JSON adds XNNPACK and a per-node EP assignment.
    """
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    basic = work / "basic.onnx"
    optimize_model(onnx_path, basic, use_external_initializers=True)
    text = io.StringIO()
    logger = logging.getLogger(f"graphopt.ort_mobile.usability.{id(text)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(text)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    try:
        try_eps = uc.checker(basic.resolve(), logger)
    finally:
        logger.removeHandler(handler)

    proto = ModelProtoWithShapeInfo(basic).model_with_shape_info
    dynamic_inputs, dynamic_values = uc.check_shapes(proto.graph)
    eps = {}
    node_eps: dict[str, list[str]] = {}
    for ep, check in _ep_checkers(work).items():
        as_is = check(proto, True)
        if_fixed = check(proto, False)
        eps[ep] = {"as_is": _partition_json(as_is), "if_shapes_fixed": _partition_json(if_fixed)}
        for group in if_fixed.supported_groups:
            for node in group:
                node_eps.setdefault(node.name, []).append(ep)
    nodes = [{"name": n.name, "op": n.op_type, "domain": n.domain or "ai.onnx", "eps": node_eps.get(n.name, [])}
             for n in proto.graph.node]
    report = {
        "model": model_name,
        "optimization": "basic (as before ORT-format conversion)",
        "dynamic_inputs": [i.name for i in dynamic_inputs],
        "dynamic_values": dynamic_values,
        "try_nnapi_or_coreml": bool(try_eps),
        "eps": eps,
        "nodes": nodes,
    }
    return report, text.getvalue()


def _usability_markdown(report: dict, log_text: str) -> str:
    lines = [f"# Mobile usability: {report['model']}", "",
             f"- dynamic inputs: {', '.join(report['dynamic_inputs']) or 'none'}",
             f"- NNAPI or CoreML worth trying: {'yes' if report['try_nnapi_or_coreml'] else 'no'}", "",
             "| EP | shapes | supported nodes | partitions | suitability | unsupported ops |",
             "|---|---|---|---|---|---|"]
    for ep, views in report["eps"].items():
        for view, info in views.items():
            lines.append(f"| {ep} | {view.replace('_', ' ')} | {info['supported_nodes']}/{info['nodes']} | "
                         f"{info['partitions']} | {info['suitability']} | {', '.join(info['unsupported_ops'])} |")
    lines += ["", "## onnxruntime's analysis", "", "```", log_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _refuse_4bit(model: Model) -> None:
    """The ORT format has no int4/uint4 tensors: onnxruntime writes the .ort but cannot load it."""
    import onnx

    for tensor in model.graph.tensors().values():
        export_dtype = getattr(tensor, "export_dtype", None)
        dtype = getattr(tensor, "dtype", None)
        if export_dtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or str(dtype) in ("int4", "uint4"):
            raise BackendError(
                f"backend 'ort-mobile': tensor '{tensor.name}' of '{model.name}' is 4-bit, which the ORT format "
                "cannot store; quantize weights to 8 bits for ORT Mobile (or ship the ONNX model)")


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence a chatty onnxruntime logger below WARNING for the duration."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_qdq(model: Model) -> bool:
    return any(node.op in _QDQ_OPS for node in model.graph.nodes)


def _session_options(target_platform: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # the converter bakes its optimizations with this setting; the reference must match it
    options.add_session_config_entry("session.qdqisint8allowed", "1" if target_platform == "arm" else "0")
    return options


@register_backend
@dataclass(frozen=True)
class OrtMobile(Backend):
    """ORT Mobile package: `model.ort`, `required_operators.config`, `mobile_usability.{json,md}`;
    for a portable decoder `prefill.ort` and `decode.ort` instead, one config for both, and
    `prefill.mobile_usability.*`, `decode.mobile_usability.*`.

    Reads the ONNX form (float or QDQ). Writes, atomically into the out dir:
    1. `model.ort`: the model in ORT format (onnxruntime's `convert_onnx_models_to_ort`),
       optimized in the `fixed` style (optimizations baked in) or `runtime` style (basic
       optimizations baked, the rest saved for replay, for NNAPI/CoreML).
    2. `required_operators.config`: the operator list for an onnxruntime reduced build
       (`--include_ops_by_config`), with per-op types when `type_reduction`.
    3. `mobile_usability.json` / `.md`: which of NNAPI, CoreML and XNNPACK would take which nodes.
    Validation runs `model.ort` and the ONNX model on the CPU EP with the same session settings on
    the model's sample inputs (or feeds built from its input specs, `validation_feeds`); a
    decoder's `.ort` graphs and its ONNX graphs each run a prefill of the sample tokens and
    decode steps with their own cache (`decoder_steps`). Logits and outputs: max |diff| <= `atol`
    for float models, exactly equal for QDQ models.
    """

    name: ClassVar[str] = "ort-mobile"
    optimization_style: Literal["fixed", "runtime"] = field(
        default="fixed", metadata={"help": "fixed: bake optimizations in; runtime: replay them (NNAPI/CoreML)"})
    target_platform: Literal["arm", "amd64"] = field(default="arm", metadata={"help": "device CPU the .ort is tuned for"})
    type_reduction: bool = field(default=False, metadata={"help": "per-op type lists in the operator config"})
    usability: bool = field(default=True, metadata={"help": "write the NNAPI/CoreML/XNNPACK usability report"})
    atol: float = field(default=1e-5, metadata={"help": "max |diff| of float outputs in validation (QDQ: exact)"})

    def emit(self, model: Model, out_dir: Path, *, force: bool = False) -> Artifact:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        model.require("onnx", f"backend '{self.name}'")
        _refuse_4bit(model)  # a decoder's graphs hold its weights
        graphs = decoder_graphs(model)
        out_dir = Path(out_dir)
        inputs = [model.source] if model.source else []
        files = list(graphs.graphs) if graphs else ["model.onnx"]
        stems = [Path(f).stem for f in files]
        ort_names, config_name = _ort_file_names(self.optimization_style, stems)
        report: dict = {"optimization_style": self.optimization_style, "target_platform": self.target_platform,
                        "qdq": _is_qdq(model), "graphs": dict(zip(files, ort_names))}
        with OutputSet(out_dir, inputs=inputs, force=force) as out:
            staging = out.staging
            work = staging / "work"
            (work / "onnx").mkdir(parents=True)
            if graphs:  # the graphs share one weights file, as in a decoder folder
                graphs.write(work / "onnx")
            else:
                model.write(work / "onnx" / "model.onnx")
            converter_log = io.StringIO()
            try:
                with contextlib.redirect_stdout(converter_log), _quiet("ort_format_model.utils"):
                    convert_onnx_models_to_ort(
                        work / "onnx", output_dir=work / "ort",
                        optimization_styles=[OptimizationStyle[self.optimization_style.capitalize()]],
                        target_platform=self.target_platform, enable_type_reduction=self.type_reduction,
                    )
            except Exception as exc:  # onnxruntime raises its own Fail/RuntimeError types
                raise BackendError(f"backend '{self.name}': onnxruntime could not convert model "
                                   f"'{model.name}' to ORT format: {exc}") from exc
            log.debug("convert_onnx_models_to_ort:\n%s", converter_log.getvalue())
            if self.type_reduction:
                config_name = config_name.replace("required_operators", "required_operators_and_types")
            for stem, ort_name in zip(stems, ort_names):
                (work / "ort" / ort_name).rename(staging / f"{stem}.ort")
            (work / "ort" / config_name).rename(staging / "required_operators.config")
            written = [f"{stem}.ort" for stem in stems] + ["required_operators.config"]
            if self.usability:
                report["usability"] = {}
                for file, stem in zip(files, stems):
                    prefix = "" if len(files) == 1 else f"{stem}."
                    name = model.name if len(files) == 1 else f"{model.name}/{file}"
                    (work / stem).mkdir()
                    usability, text = usability_report(work / "onnx" / file, work / stem, name)
                    atomic_write_text(staging / f"{prefix}mobile_usability.json", json.dumps(usability, indent=2))
                    atomic_write_text(staging / f"{prefix}mobile_usability.md", _usability_markdown(usability, text))
                    written += [f"{prefix}mobile_usability.json", f"{prefix}mobile_usability.md"]
                    suitability = {ep: views["as_is"]["suitability"] for ep, views in usability["eps"].items()}
                    report["usability"].update(suitability if len(files) == 1 else {file: suitability})
            report["operators"] = _config_ops((staging / "required_operators.config").read_text())
            warning = _int8_matmulnbits_warning(model, report["operators"])
            if warning:
                log.warning("backend '%s': %s", self.name, warning)
                report["warnings"] = [warning]
            atomic_write_text(staging / "ort_mobile.json", json.dumps(report, indent=2))
            written.append("ort_mobile.json")
        report["bytes"] = sum((out_dir / f"{stem}.ort").stat().st_size for stem in stems)
        return Artifact(backend=self.name, out_dir=out_dir, files=[out_dir / f for f in written], report=report)

    def _mobile_session(self, path: Path):
        import onnxruntime as ort

        options = _session_options(self.target_platform)
        if self.optimization_style == "runtime":
            options.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"{path}: onnxruntime cannot load the ORT-format model: {exc}") from exc

    def validate(self, artifact: Artifact, model: Model) -> dict:
        graphs = decoder_graphs(model)
        if graphs:
            return self._validate_decoder(artifact, model, graphs)
        feeds_list, feeds_source = validation_feeds(model)
        ort_path = artifact.out_dir / "model.ort"
        mobile = self._mobile_session(ort_path)
        reference = _reference_session(model, self.target_platform)
        pairs = [(name, a, b) for name, a, b in
                 paired_outputs(reference, mobile, feeds_list, [o.name for o in model.outputs])]
        found = self._compare(ort_path, pairs, _is_qdq(model), "output")
        return {"batches": len(feeds_list), "feeds": feeds_source, **found}

    def _validate_decoder(self, artifact: Artifact, model: Model, graphs) -> dict:
        """The `.ort` graphs and the ONNX graphs each run a prefill and decode steps (`decoder_steps`)."""
        mobile = {file: self._mobile_session(artifact.out_dir / f"{Path(file).stem}.ort") for file in graphs.graphs}
        reference = graphs.sessions(config={"session.qdqisint8allowed": "1" if self.target_platform == "arm" else "0"})
        pairs = decoder_steps(graphs.spec, reference, mobile, model)
        found = self._compare(artifact.out_dir, pairs, _is_qdq(model), "step")
        return {"graphs": list(graphs.graphs), "steps": [step for step, _, _ in pairs], **found}

    def _compare(self, where: Path, pairs, exact: bool, what: str) -> dict:
        """Max |difference| of (name, ONNX value, ORT-format value) pairs, within `atol` (QDQ: exact)."""
        worst = 0.0
        for name, a, b in pairs:
            if a.shape != b.shape:
                raise BackendError(f"{where}: {what} '{name}' has shape {b.shape}, the ONNX model {a.shape}")
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)))
        limit = 0.0 if exact else self.atol
        if worst > limit:
            kind = "QDQ (must be exact)" if exact else f"float (atol {self.atol})"
            raise BackendError(f"{where}: outputs differ from the ONNX model by {worst:.3g}, {kind}")
        return {"max_abs_diff": worst, "exact_required": exact, "passed": True}


def _reference_session(model: Model, target_platform: str):
    """The ONNX model on the CPU EP, with the session settings the converter used."""
    import onnxruntime as ort

    proto = model.to_onnx()
    return ort.InferenceSession(proto.SerializeToString(), _session_options(target_platform),
                                providers=["CPUExecutionProvider"])


def _int8_matmulnbits_warning(model: Model, operators: dict[str, list[str]]) -> str:
    """A warning when the converter fused DequantizeLinear -> MatMul pairs into MatMulNBits.

    onnxruntime does that for a linear layer whose activation no integer kernel takes (16-bit or
    float) and bakes accuracy level 4 into the node: the activation is quantized to int8 at run
    time, so an A16 layer runs as A8 on the phone (SmolLM2 W8A16: overlap@1 0.970 -> 0.961).
    """
    if "MatMulNBits" not in operators.get("com.microsoft", []):
        return ""
    if any(node.op == "MatMulNBits" for node in model.graph.nodes):
        return ""  # the model asked for MatMulNBits itself (weight-only int4/int8 blocks)
    return ("onnxruntime fused DequantizeLinear -> MatMul into MatMulNBits at accuracy level 4: the "
            "activations of those linear layers (16-bit or float in the model) are quantized to int8 at "
            "run time; the ORT CPU session config 'session.qdq_matmulnbits_accuracy_level=1' keeps them "
            "in float, but the fixed-style .ort has the fusion baked in")


def _config_ops(config_text: str) -> dict[str, list[str]]:
    """domain -> op names, from a required-operators config (`domain;opset;op1,op2` lines)."""
    ops: dict[str, set[str]] = {}
    for line in config_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, _opset, names = line.split(";", 2)
        ops.setdefault(domain, set()).update(_top_level_names(names))
    return {domain: sorted(names) for domain, names in sorted(ops.items())}


def _top_level_names(entries: str) -> list[str]:
    """Op names of `Add,MatMul{"inputs": {...}}`: commas inside type-reduction braces do not split."""
    names, depth, current = [], 0, ""
    for char in entries + ",":
        if char == "," and depth == 0:
            names.append(current.split("{")[0].strip())
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current += char
    return [n for n in names if n]
