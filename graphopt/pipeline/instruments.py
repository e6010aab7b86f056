"""Instruments of the pass manager: timing, sizes, provenance, structural diff, fidelity, checks, dumps.

An instrument watches every step (a pass, or the lowering) through four optional hooks, in the
spirit of TVM's PassInstrument: `run_begin(model)`, `before_step(step, model)`,
`after_step(step, before, after, record)` and `run_end(model, report)`. The manager calls the
`before_step` hooks in list order and the `after_step` hooks in reverse order, so each instrument
wraps the ones after it: `Timing`, last by default, times the pass alone, and `Log`, first,
prints what all the others recorded. Passes hold none of this code.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from graphopt.errors import PipelineError
from graphopt.ir import Model
from graphopt.pipeline.report import Report, StepRecord, fidelity_text

__all__ = [
    "Step", "Instrument", "Timing", "Sizes", "Provenance", "StructuralDiff", "Fidelity", "Checker",
    "Contracts", "Dump", "Log", "default_instruments", "fingerprint",
]


@dataclass(frozen=True)
class Step:
    """One step of a plan: its name, the pass (None for the lowering) and its position."""

    name: str
    pass_: object | None
    index: int


class Instrument:
    """Base: every hook does nothing."""

    def run_begin(self, model: Model) -> None:
        pass

    def before_step(self, step: Step, model: Model) -> None:
        pass

    def after_step(self, step: Step, before: Model, after: Model, record: StepRecord) -> None:
        pass

    def run_end(self, model: Model, report: Report) -> None:
        pass


class Timing(Instrument):
    """Wall time of the step (`record.seconds`)."""

    def before_step(self, step, model):
        self._start = time.perf_counter()

    def after_step(self, step, before, after, record):
        record.seconds = time.perf_counter() - self._start


class Sizes(Instrument):
    """Nodes, parameters and weight bytes before and after the step."""

    def before_step(self, step, model):
        self._before = (model.num_nodes(), model.num_params(), model.num_bytes())

    def after_step(self, step, before, after, record):
        record.nodes = (self._before[0], after.num_nodes())
        record.params = (self._before[1], after.num_params())
        record.bytes = (self._before[2], after.num_bytes())


def _node_names(model: Model) -> set[str]:
    if model.form == "fx":
        return {n.name for n in model.fx.graph.nodes}
    return {n.name for n in model.graph.nodes if n.name}


class Provenance(Instrument):
    """Stamps every node a pass created with the pass's name (`model.meta.provenance`)."""

    def before_step(self, step, model):
        self._names = _node_names(model)

    def after_step(self, step, before, after, record):
        if step.pass_ is None:
            return
        for name in _node_names(after) - self._names:
            after.meta.provenance.setdefault(name, step.name)


class StructuralDiff(Instrument):
    """A summary of `graphopt.analysis.diff` between a changed step's input and output (same form)."""

    def after_step(self, step, before, after, record):
        if record.changed and before.form == after.form:
            from graphopt.analysis.diff import diff_models

            record.diff = diff_models(before, after).summary()


class Fidelity(Instrument):
    """Outputs on the model's sample inputs after each changed step against the step's input:
    SQNR, cosine and, for causal LMs, overlap@1 / overlap@8 (torch for FX, onnxruntime for ONNX).
    An unchanged step is not re-run; a model without sample inputs is noted, not measured."""

    def run_begin(self, model):
        self._reference = _outputs(model)

    def after_step(self, step, before, after, record):
        if not record.changed:
            return
        if self._reference is None or not after.sample_inputs:
            record.notes.append("fidelity not measured: the model has no sample inputs")
            self._reference = None
            return
        outputs = _outputs(after)
        record.fidelity = _compare(self._reference, outputs, after.task)
        self._reference = outputs
        if after.meta.extra.get("sample_inputs") == "synthesized":
            record.notes.append("fidelity measured on synthesized inputs (seeded normal floats, zero integers)")


def _outputs(model: Model) -> list[list[np.ndarray]] | None:
    if not model.sample_inputs:
        return None
    if model.form == "fx":
        run = model.runner()
        return [run(feeds) for feeds in model.sample_inputs]
    session = model.session(low_memory=model.num_bytes() > LARGE_MODEL_BYTES, config=GRAPH_OWN_MATH)
    return [model.run(feeds, session=session) for feeds in model.sample_inputs]


def _compare(reference, outputs, task: str) -> dict:
    from graphopt.evaluation.metrics import compare_outputs

    ref = [np.concatenate([r[0].reshape(-1, r[0].shape[-1]) for r in reference])]
    out = [np.concatenate([o[0].reshape(-1, o[0].shape[-1]) for o in outputs])]
    return compare_outputs(ref, out, task)


class Checker(Instrument):
    """The pipeline's result passes `onnx.checker` (full check) and loads in onnxruntime, or the
    run fails naming the last step that changed the model.

    By default the check runs once, at the end (on a 135M model it costs ~6 s; on a large one a
    second session per step would double the memory). `every_step` checks after every changed
    ONNX step instead, which names the step that broke the model exactly (a debug aid)."""

    def __init__(self, every_step: bool = False):
        self.every_step = every_step
        self._last: Step | None = None

    def after_step(self, step, before, after, record):
        if record.changed:
            self._last = step
        if self.every_step and record.changed and after.form == "onnx":
            check_model(after, f"the output of step '{step.name}'")

    def run_end(self, model, report):
        if model.form == "onnx" and not self.every_step and self._last is not None:
            check_model(model, f"the pipeline's result (last changed by '{self._last.name}'; "
                               "check every step to find the one that broke it)")


# a step's fidelity is its graph's own math: onnxruntime's default fuses a weight DequantizeLinear ->
# MatMul into MatMulNBits at accuracy level 4, rounding the float or 16-bit activation to int8, which
# would charge use_ort_kernels' choice of kernel to the quantize step before it
GRAPH_OWN_MATH = {"session.qdq_matmulnbits_accuracy_level": "1"}
LARGE_MODEL_BYTES = 1 << 30  # weights past this are checked from a file and run without packed copies


def check_model(model: Model, what: str) -> None:
    """Raise PipelineError unless `model` passes onnx.checker's full check and loads in onnxruntime.

    The weights are never copied: a model whose weights fit a protobuf comfortably is checked in
    memory; a larger one is written to a temporary folder (streamed) and checked there, since the
    checker reads external data only from files."""
    import tempfile

    import onnx

    from graphopt.ir.onnx_files import write_onnx
    from graphopt.ir.runtime import ort_session

    externals: dict = {}
    proto = model.to_onnx(externals=externals)
    large = sum(a.nbytes for a in externals.values()) > LARGE_MODEL_BYTES
    try:
        with tempfile.TemporaryDirectory(prefix="graphopt-check-") as tmp:
            path = Path(tmp) / "model.onnx"
            write_onnx(proto, path, externals)
            onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PipelineError(f"{what} is not a valid ONNX model: {_first_line(exc)}") from exc
    try:
        ort_session(proto, consume=True, optimization="basic", externals=externals, low_memory=large)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise PipelineError(f"{what} does not load in onnxruntime: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:400] if text else type(exc).__name__


def fingerprint(model: Model) -> str:
    """A digest of a model's structure and weights: equal fingerprints mean an unchanged model."""
    from graphopt.analysis.diff import view_of

    view = view_of(model)
    digest = hashlib.sha256()
    for name, node in sorted(view.nodes.items()):
        digest.update(repr((name, node.op, node.inputs, node.outputs)).encode())
    for name in sorted(view.weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(view.values(name)).tobytes())
    digest.update(repr((view.inputs, view.outputs)).encode())
    if model.form == "onnx":  # the same nodes at another opset are another model (upgrade_opset)
        digest.update(repr(model.graph.opset).encode())
    return digest.hexdigest()


class Contracts(Instrument):
    """Checks each pass against its claims (a debug aid, and what the contract tests run):
    a pass with `mutates_input = False` leaves its input as it was; `changed` is False exactly
    when the output equals the input."""

    def before_step(self, step, model):
        self._input = fingerprint(model) if step.pass_ is not None else None

    def after_step(self, step, before, after, record):
        if step.pass_ is None:
            return
        if fingerprint(before) != self._input:
            raise PipelineError(f"pass '{step.name}' changed its input model, but declares mutates_input False"
                                if not step.pass_.mutates_input else
                                f"pass '{step.name}' changed the model the manager kept for comparison")
        same = fingerprint(after) == self._input
        if same == record.changed:
            raise PipelineError(f"pass '{step.name}' returned changed={record.changed}, but its output "
                                f"{'equals' if same else 'differs from'} its input")


class Dump(Instrument):
    """Saves the ONNX model after every step as `NN-step.onnx` in `folder`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._count = 0

    def after_step(self, step, before, after, record):
        self._count += 1
        if after.form == "onnx":
            after.save(self.folder / f"{self._count:02d}-{step.name}.onnx")


class Log(Instrument):
    """One line per step: time, node counts and fidelity, through `log`."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log

    def after_step(self, step, before, after, record):
        parts = [f"[{step.name}]"]
        if record.seconds is not None:
            parts.append(f"{record.seconds:.2f} s")
        if record.nodes is not None:
            parts.append(f"nodes {record.nodes[0]} -> {record.nodes[1]}")
        if not record.changed:
            parts.append("unchanged" + (f" ({record.stats['reason']})" if record.stats.get("reason") else ""))
        if record.fidelity:
            parts.append(fidelity_text(record.fidelity))
        self.log(" ".join(parts[:1]) + " " + ", ".join(parts[1:]))


def default_instruments(*, verify: bool = True, check: bool = True, dump_dir: str | Path | None = None,
                        log: Callable[[str], None] | None = print, contracts: bool = False) -> list[Instrument]:
    """The instruments `Pipeline` uses unless given its own list, outermost first."""
    found: list[Instrument] = []
    if log is not None:
        found.append(Log(log))
    if dump_dir is not None:
        found.append(Dump(dump_dir))
    if contracts:
        found.append(Contracts())
    found += [Provenance(), Sizes(), StructuralDiff()]
    if verify:
        found.append(Fidelity())
    if check:
        found.append(Checker())
    found.append(Timing())
    return found
