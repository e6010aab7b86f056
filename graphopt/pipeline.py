"""The pass manager: plans forms, lowers when needed, runs passes in order, and instruments each.

Instrumentation (timing, sizes, structural diff, fidelity, provenance) lives here, never in a pass.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt import metrics
from graphopt.errors import GraphoptError, PipelineError
from graphopt.ir import MIN_OPSET, Model
from graphopt.pass_infra import PASSES, Pass, PassContext

__all__ = ["Pipeline", "PipelineResult", "StepRecord", "Report", "get_pass", "available_passes"]


def available_passes() -> dict[str, type[Pass]]:
    """The pass registry, filled by importing the `graphopt.passes` package."""
    importlib.import_module("graphopt.passes")
    return dict(sorted(PASSES.items()))


def get_pass(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        raise PipelineError(f"unknown pass '{name}' (known: {', '.join(passes)})")
    return passes[name]


@dataclass
class StepRecord:
    """What the pass manager measured around one step (a pass or the lowering)."""

    name: str
    form: str
    seconds: float
    changed: bool
    nodes: tuple[int, int]
    params: tuple[int, int]
    bytes: tuple[int, int]
    diff: dict = field(default_factory=dict)
    fidelity: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


@dataclass
class Report:
    """Per-step records of one pipeline run; readable as Markdown, machine-readable as JSON."""

    model: str
    steps: list[StepRecord] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"model": self.model, "steps": [_jsonable(vars(s)) for s in self.steps]}

    def to_markdown(self) -> str:
        fid_keys = sorted({k for s in self.steps for k in s.fidelity}, key=_fidelity_order)
        head = ["step", "form", "time s", "changed", "nodes", "params", "bytes", "diff"] + fid_keys
        lines = [f"# graphopt report: {self.model}", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for s in self.steps:
            row = [s.name, s.form, f"{s.seconds:.2f}", "yes" if s.changed else "no",
                   _arrow(*s.nodes), _arrow(*s.params), _arrow(*s.bytes), _diff_text(s.diff)]
            row += [_fmt(s.fidelity.get(k)) for k in fid_keys]
            lines.append("| " + " | ".join(row) + " |")
        stats = [(s.name, s.stats) for s in self.steps if s.stats]
        if stats:
            lines += ["", "## Pass statistics", ""]
            for name, st in stats:
                lines.append(f"- **{name}**: " + ", ".join(f"{k}={_stat_text(v)}" for k, v in st.items() if not isinstance(v, list)))
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path, stem: str = "report") -> tuple[Path, Path]:
        from graphopt.onnx_io import atomic_write_text

        out_dir = Path(out_dir)
        js = atomic_write_text(out_dir / f"{stem}.json", json.dumps(self.to_json(), indent=2))
        md = atomic_write_text(out_dir / f"{stem}.md", self.to_markdown())
        return js, md


@dataclass
class PipelineResult:
    model: Model
    report: Report


class Pipeline:
    """An ordered list of passes.

    Each pass runs in the form the model is in if it supports it; a pass that needs ONNX on an
    FX model triggers one lowering; a pass that needs FX after lowering is rejected before any
    pass runs. With `verify`, each step's outputs on the model's sample inputs are compared with
    the step's input (torch for FX, onnxruntime for ONNX).
    """

    def __init__(self, passes: list[Pass], *, verify: bool = True, opset: int = MIN_OPSET,
                 progress: bool = True, dump_dir: str | Path | None = None, log=print):
        for p in passes:
            if not isinstance(p, Pass):
                raise PipelineError(f"Pipeline takes Pass instances, got {p!r}")
        self.passes = list(passes)
        self.verify = verify
        self.opset = opset
        self.progress = progress
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.log = log

    def plan(self, form: str) -> list[tuple[str, Pass | None]]:
        """The steps to run from a model in `form`: ("lower", None) or (form, pass)."""
        steps = []
        for index, p in enumerate(self.passes):
            forms = p.forms()
            if form in forms:
                steps.append((form, p))
                continue
            if form == "fx" and "onnx" in forms:
                steps.append(("lower", None))
                form = "onnx"
                steps.append((form, p))
                continue
            ran = ", ".join(q.name for q in self.passes[:index]) or "none"
            raise PipelineError(
                f"pass '{p.name}' (#{index + 1}) needs the FX form, but the model is ONNX by then "
                f"(passes before it: {ran}); there is no ONNX -> FX path: move '{p.name}' before the "
                "first ONNX-only pass or start from a PyTorch model"
            )
        return steps

    def run(self, model: Model, calib: list[dict[str, np.ndarray]] | None = None) -> PipelineResult:
        steps = self.plan(model.form)
        ctx = PassContext(calib=calib, progress=self.progress)
        report = Report(model=model.name)
        current = model
        reference = self._outputs(current) if self.verify else None
        done: list[str] = []
        for form, p in steps:
            name = "lower" if p is None else p.name
            before_nodes = _node_names(current)
            sizes_before = (current.num_nodes(), current.num_params(), current.num_bytes())
            start = time.perf_counter()
            try:
                if p is None:
                    from graphopt.lowering import lower

                    new_model, changed, stats = lower(current, opset=self.opset, log=self.log), True, {}
                else:
                    # Copy even intermediates: the step's diff compares `current` with the result.
                    subject = current.copy() if p.mutates_input else current
                    result = p.run(subject, ctx)
                    new_model, changed, stats = result.model, result.changed, result.stats
            except GraphoptError as exc:
                raise PipelineError(
                    f"pass '{name}' failed (after: {', '.join(done) or 'none'}): {exc}"
                ) from exc
            seconds = time.perf_counter() - start
            if p is not None:
                for node_name in _node_names(new_model) - before_nodes:
                    new_model.meta.provenance.setdefault(node_name, name)
            record = StepRecord(
                name=name, form=new_model.form, seconds=seconds, changed=changed,
                nodes=(sizes_before[0], new_model.num_nodes()),
                params=(sizes_before[1], new_model.num_params()),
                bytes=(sizes_before[2], new_model.num_bytes()), stats=stats,
            )
            if current.form == new_model.form and changed:
                from graphopt.diffing import diff_models

                record.diff = diff_models(current, new_model).summary()
            if self.verify and changed:
                outputs = self._outputs(new_model)
                record.fidelity = _fidelity(reference, outputs, new_model.task)
                reference = outputs
            elif self.verify:
                record.fidelity = _fidelity(reference, reference, new_model.task)
            report.steps.append(record)
            self.log(f"[{name}] {seconds:.2f} s, nodes {record.nodes[0]} -> {record.nodes[1]}"
                     + (f", {_fidelity_text(record.fidelity)}" if record.fidelity else ""))
            if self.dump_dir and new_model.form == "onnx":
                new_model.save(self.dump_dir / f"{len(report.steps):02d}-{name}.onnx")
            done.append(name)
            current = new_model
        return PipelineResult(current, report)

    def _outputs(self, model: Model) -> list[list[np.ndarray]] | None:
        if not model.sample_inputs:
            return None
        session = model.session() if model.form == "onnx" else None
        return [model.run(feeds, session=session) for feeds in model.sample_inputs]


def _fidelity(reference, outputs, task: str) -> dict:
    if reference is None or outputs is None:
        return {}
    ref = [np.concatenate([r[0].reshape(-1, r[0].shape[-1]) for r in reference])]
    out = [np.concatenate([o[0].reshape(-1, o[0].shape[-1]) for o in outputs])]
    return metrics.compare_outputs(ref, out, task)


def _node_names(model: Model) -> set[str]:
    if model.form == "fx":
        return {n.name for n in model.fx.graph.nodes}
    return {n.name for n in model.graph.nodes if n.name}


def _fidelity_order(key: str) -> tuple:
    order = ["sqnr_db", "cosine", "overlap@1"]
    return (order.index(key) if key in order else len(order), key)


def _fidelity_text(fid: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(fid.items(), key=lambda kv: _fidelity_order(kv[0])))


def _arrow(a, b) -> str:
    return f"{a:,}" if a == b else f"{a:,} → {b:,}"


def _diff_text(diff: dict) -> str:
    if not diff:
        return ""
    parts = []
    for key in ("ops_added", "ops_removed"):
        ops = diff.get(key) or {}
        sign = "+" if key == "ops_added" else "−"
        parts += [f"{sign}{n} {op}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1])[:4]]
    return ", ".join(parts)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _stat_text(value: Any) -> str:
    """A statistic for the report's text: a dict of [part, whole] pairs as "key part/whole ..."
    (e.g. int16_share), anything else as _fmt writes it (lists are left to the JSON)."""
    if isinstance(value, dict):
        return " ".join(f"{k} {v[0]}/{v[1]}" if isinstance(v, list) and len(v) == 2 else f"{k} {_fmt(v)}"
                        for k, v in value.items())
    return _fmt(value)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def available_backends() -> dict:
    """The backend registry, filled by importing the `graphopt.backends` package."""
    from graphopt.backend_infra import BACKENDS

    importlib.import_module("graphopt.backends")
    return dict(sorted(BACKENDS.items()))


def export(model: Model, backend: str, out_dir: str | Path, options: dict | None = None, *,
           validate: bool = True):
    """Emit `model` with the named backend into `out_dir`, then validate the artifact.

    An FX model is lowered first (backends read the ONNX form only).
    """
    backends = available_backends()
    if backend not in backends:
        raise PipelineError(f"unknown backend '{backend}' (known: {', '.join(backends) or 'none'})")
    emitter = backends[backend].from_options(options)
    if model.form == "fx":
        from graphopt.lowering import lower

        model = lower(model)
    artifact = emitter.emit(model, Path(out_dir))
    if validate:
        artifact.validation = emitter.validate(artifact, model)
    return artifact
