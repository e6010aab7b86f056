"""The pass manager: plans IR forms, lowers when needed, runs passes in order under its instruments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphopt.errors import GraphoptError, PipelineError
from graphopt.ir import MIN_OPSET, Model, graph_opset
from graphopt.pipeline.instruments import Instrument, Step, default_instruments
from graphopt.pipeline.passes import Pass, PassContext
from graphopt.pipeline.report import Report, StepRecord

__all__ = ["Pipeline", "PipelineResult"]


@dataclass
class PipelineResult:
    model: Model
    report: Report


class Pipeline:
    """An ordered list of passes.

    Each pass runs in the form the model is in if it supports it; a pass that needs ONNX on an
    FX model triggers one lowering; a pass that needs FX after lowering is rejected before any
    pass runs; an ONNX model below opset MIN_OPSET gets an `upgrade_opset` step first (converted
    and checked numerically). What is measured around each step is up to the instruments
    (`graphopt.pipeline.instruments`); by default: provenance, sizes, structural diff, fidelity
    on the model's sample inputs (`verify`), a validity check of the result (`check`: onnx.checker
    and onnxruntime), per-step dumps (`dump_dir`), timing and a log line. `contracts` checks every
    pass against its `mutates_input` and `changed` claims (slow: it hashes the weights).
    """

    def __init__(self, passes: list[Pass], *, verify: bool = True, check: bool = True, opset: int = MIN_OPSET,
                 progress: bool = True, dump_dir: str | Path | None = None, log=print, contracts: bool = False,
                 instruments: list[Instrument] | None = None):
        for p in passes:
            if not isinstance(p, Pass):
                raise PipelineError(f"Pipeline takes Pass instances, got {p!r}")
        self.passes = list(passes)
        self.opset = opset
        self.progress = progress
        self.log = log
        self.instruments = instruments if instruments is not None else default_instruments(
            verify=verify, check=check, dump_dir=dump_dir, log=log, contracts=contracts)

    def plan(self, form: str) -> list[Step]:
        """The steps to run from a model in `form`: the passes, with a "lower" step where needed."""
        steps: list[Step] = []
        for index, p in enumerate(self.passes):
            forms = p.forms()
            if form not in forms and form == "fx" and "onnx" in forms:
                steps.append(Step("lower", None, len(steps)))
                form = "onnx"
            if form not in forms:
                ran = ", ".join(q.name for q in self.passes[:index]) or "none"
                raise PipelineError(
                    f"pass '{p.name}' (#{index + 1}) needs the FX form, but the model is ONNX by then "
                    f"(passes before it: {ran}); there is no ONNX -> FX path: move '{p.name}' before the "
                    "first ONNX-only pass or start from a PyTorch model"
                )
            steps.append(Step(p.name, p, len(steps)))
        return steps

    def _lower(self, model: Model) -> Model:
        from graphopt.lowering import lower

        return lower(model, opset=self.opset, log=self.log or (lambda _: None))

    def run(self, model: Model, calib: list[dict[str, np.ndarray]] | None = None) -> PipelineResult:
        steps = self.plan(model.form)
        if _needs_upgrade(model, steps):  # an ONNX file from an older exporter: upgraded first, checked
            from graphopt.pipeline.registry import get_pass

            self.log(f"{model.name} has opset {graph_opset(model.graph)}: upgrade_opset runs first")
            steps = [Step("upgrade_opset", get_pass("upgrade_opset")(), 0)] + [
                Step(s.name, s.pass_, s.index + 1) for s in steps]
        ctx = PassContext(calib=calib, progress=self.progress, lower=self._lower)
        report = Report(model=model.name)
        for instrument in self.instruments:
            instrument.run_begin(model)
        current = model
        done: list[str] = []
        for step in steps:
            for instrument in self.instruments:
                instrument.before_step(step, current)
            try:
                if step.pass_ is None:
                    new_model, changed, stats = self._lower(current), True, {}
                else:
                    # copied even between steps: instruments compare the step's input with its output
                    subject = current.copy() if step.pass_.mutates_input else current
                    result = step.pass_.run(subject, ctx)
                    new_model, changed, stats = result.model, result.changed, result.stats
            except GraphoptError as exc:
                raise PipelineError(
                    f"pass '{step.name}' failed (after: {', '.join(done) or 'none'}): {exc}") from exc
            record = StepRecord(name=step.name, form=new_model.form, changed=changed, stats=stats)
            try:
                for instrument in reversed(self.instruments):
                    instrument.after_step(step, current, new_model, record)
            except PipelineError as exc:
                raise PipelineError(f"{exc} (passes run: {', '.join(done + [step.name])})") from exc
            report.steps.append(record)
            done.append(step.name)
            current = new_model
            if changed and ctx.calib:
                ctx.calib = follow_cache_dtype(current, ctx.calib)
        for instrument in self.instruments:
            instrument.run_end(current, report)
        return PipelineResult(current, report)


def follow_cache_dtype(model: Model, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """A decoder's calibration feeds (prefills from an empty cache) with their cache in the type the
    model now takes (`quantize_kv` makes it int8); other models' feeds as they are."""
    from graphopt.ir.decoder import DecoderSpec, empty_cache_as

    spec = DecoderSpec.of(model)
    return feeds if spec is None else [empty_cache_as(spec, feed) for feed in feeds]


def _needs_upgrade(model: Model, steps: list[Step]) -> bool:
    """An ONNX model below the opset the passes need, whose plan does not start by upgrading it."""
    return (model.form == "onnx" and bool(steps) and steps[0].name != "upgrade_opset"
            and graph_opset(model.graph, default=MIN_OPSET) < MIN_OPSET)
