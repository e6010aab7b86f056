"""How a row's model is made: the float model, a recipe, passes, a peer tool, or a QAT run.

`Builder.build(table, row)` applies the row's build steps in order and returns a `Built`: the
model, the seconds the steps took (the float model's loading excluded), and the statistics of
every pass that ran, by pass name. Recipes and passes run through `graphopt.Pipeline`
(instruments off: the bench measures the result, not each step), calibrated on the protocol's
calibration feeds (or the protocol's calibration set the table names); a recipe whose calibration
section says otherwise is refused, so a recipe's bench figure is the figure `graphopt convert` gives.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import graphopt
from bench.context import Context
from bench.peers import missing_package, peer
from bench.spec import BENCH, ROOT, Row, SuiteError, Table
from graphopt.errors import RecipeError
from graphopt.ir import Model
from graphopt.ir.onnx_files import load_onnx
from graphopt.recipe import load_recipe, parse_recipe

__all__ = ["Built", "Builder", "Skipped", "describe"]


class Skipped(Exception):
    """A row that cannot run in this environment (its peer's package is missing, its device absent)."""


@dataclass
class Built:
    model: Model
    seconds: float = 0.0
    stats: dict[str, dict] = field(default_factory=dict)  # pass name -> its statistics
    extra: dict[str, Any] = field(default_factory=dict)  # row values the build itself knows (QAT: train_s)
    variants: dict[str, Model] = field(default_factory=dict)  # other forms worth measuring (QAT: "torch")


def describe(row: Row) -> str:
    """The row's build as one line for the report: `recipe smollm2-w8a8.yaml`, `passes cleanup`, ..."""
    parts = []
    for kind, spec in row.build:
        if kind == "fp32":
            continue
        if kind == "recipe":
            parts.append(f"recipe {spec}")
        elif kind == "passes":
            parts.append("passes " + ", ".join(_pass_label(p) for p in spec))
        elif kind == "peer":
            parts.append(f"peer {spec['name']}" + (f" {_options(spec.get('options'))}" if spec.get("options") else ""))
        elif kind == "decoder":
            parts.append(f"graphopt decoder {_options(spec)}")
        elif kind == "genai":
            parts.append(f"onnxruntime-genai builder {_options(spec)}")
        else:
            parts.append("qat")
    return "; ".join(parts) or "the float model"


def _pass_label(entry: Any) -> str:
    if isinstance(entry, str):
        return entry
    name, options = next(iter(entry.items()))
    return f"{name} {_options(options)}" if options else name


def _options(options: dict | None) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in (options or {}).items()) + "}"


class Builder:
    """Builds rows of one table; rows with the same build share one model (`release` frees it)."""

    def __init__(self, ctx: Context, table: Table):
        self.ctx, self.table = ctx, table
        self.cache: dict[str, Built] = {}
        self.uses = {}
        for row in table.rows:
            self.uses[row.key] = self.uses.get(row.key, 0) + 1

    def build(self, row: Row) -> Built:
        if row.requires and (reason := missing_package(row.requires)):
            raise Skipped(reason)
        if row.key not in self.cache:
            self.cache[row.key] = self._build(row)
        return self.cache[row.key]

    def release(self, row: Row) -> None:
        self.uses[row.key] -= 1
        if not self.uses[row.key]:
            self.cache.pop(row.key, None)

    def _build(self, row: Row) -> Built:
        where = f"table '{self.table.name}', row '{row.name}'"
        built = None
        for kind, spec in row.build:
            self.ctx.seed()
            if kind == "fp32":
                built = Built(self.ctx.model(self.table.model, "onnx"))
            elif kind == "recipe":
                built = self._pipeline(_recipe(spec, where), built, where)
            elif kind == "passes":
                built = self._pipeline(_passes(spec, where), built, where)
            elif kind == "peer":
                built = self._peer(spec, built, where)
            elif kind == "convert":
                built = self._convert(spec, where)
            else:
                from bench.qat import qat_build

                built = qat_build(self.ctx, self.table.model, spec, where)
        return built

    def _pipeline(self, recipe, built: Built, where: str) -> Built:
        """`built`'s model through the recipe's passes (an FX-only first pass starts from the FX form)."""
        if recipe.calibration is not None:
            self._check_calibration(recipe, where)
        model = built.model
        if recipe.passes and "onnx" not in recipe.passes[0].forms():
            if built.stats:
                raise SuiteError(f"{where}: pass '{recipe.passes[0].name}' needs the FX form, but an earlier "
                                 "build step already made an ONNX model")
            model = self.ctx.model(self.table.model, "fx")
        start = time.perf_counter()
        result = graphopt.Pipeline(recipe.passes, verify=False, check=False, progress=False, log=self.ctx.log).run(
            model, calib=self.ctx.calibration(model, self.table.calibration))
        model = result.model if result.model.form == "onnx" else graphopt.lower(result.model, log=self.ctx.log)
        seconds = time.perf_counter() - start
        stats = {**built.stats, **{s.name: s.stats for s in result.report.steps}}
        return Built(model, built.seconds + seconds, stats, built.extra)

    def _convert(self, spec: dict, where: str) -> Built:
        """`graphopt convert MODEL --recipe FILE` in a process of its own, as a user runs it: its peak
        RSS, seconds, the model's and the output's bytes, and the fidelity its report gives (no
        model comes back: the memory measure reads these)."""
        import json
        import subprocess
        import sys

        from bench.context import package_path

        model = Path(package_path(self.ctx.protocol.model_source(self.table.model)))
        recipe = ROOT / "samples" / "recipes" / spec["recipe"] if not Path(spec["recipe"]).is_absolute() else Path(spec["recipe"])
        if not recipe.is_file():
            raise SuiteError(f"{where}: no recipe '{spec['recipe']}'")
        with tempfile.TemporaryDirectory(prefix="graphopt-bench-convert-") as tmp:
            probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                     "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
            command = [sys.executable, "-c", probe, sys.executable, "-m", "graphopt", "convert", str(model),
                       "--recipe", str(recipe), "-o", str(Path(tmp) / "out")]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            code, peak_kb = (int(v) for v in done.stdout.split()[-2:])
            if code:
                raise SuiteError(f"{where}: graphopt convert failed: {done.stderr.strip().splitlines()[-1]}")
            out = Path(tmp) / "out"
            report = json.loads((out / "report.json").read_text())
            fidelity = next((s["fidelity"] for s in reversed(report["steps"]) if s.get("fidelity")), {})
            written = sum(p.stat().st_size for p in out.glob("model.onnx*"))
        model_bytes = sum(p.stat().st_size for p in model.parent.glob(model.name + "*"))
        extra = {"model_bytes": model_bytes, "peak_rss": peak_kb * 1024, "output_bytes": written,
                 "sqnr_db": fidelity.get("sqnr_db"), "cosine": fidelity.get("cosine")}
        return Built(None, seconds, {s["name"]: s.get("stats", {}) for s in report["steps"]}, extra)

    def _check_calibration(self, recipe, where: str) -> None:
        cal, protocol = recipe.calibration, self.ctx.protocol
        if self.table.calibration is not None:  # the table's set: the same sources, counts and windows
            expected = self.ctx.calibration_set(self.table.calibration)
            if dataclasses.replace(cal, line=0) != dataclasses.replace(expected, line=0):
                raise SuiteError(f"{where}: recipe {recipe.path} calibrates on {cal.windows} x {cal.length} of "
                                 f"{cal.source}, the table on calibration set '{self.table.calibration}' "
                                 f"({expected.windows} x {expected.length} of {expected.source}): make them agree")
            return
        if self.table.measure == "image":  # the recipe's image count and preprocessing are the protocol's
            spec = self.ctx.image_spec(self.ctx.model(self.table.model))
            if (cal.windows, cal.image) != (protocol["images"]["calibration"], spec):
                raise SuiteError(f"{where}: recipe {recipe.path} calibrates on {cal.windows} images as {cal.image}, "
                                 f"the protocol on {protocol['images']['calibration']} as {spec}: make them agree")
            return
        model_kind = "calibration" if self.table.measure != "embedding" else "embedding"
        expected = ((protocol["calibration"]["windows"], protocol["calibration"]["length"]) if model_kind == "calibration"
                    else (protocol["embedding"]["calib_batches"], protocol["embedding"]["calib_max_length"]))
        if (cal.windows, cal.length, cal.split) != (*expected, "calib"):
            raise SuiteError(f"{where}: recipe {recipe.path} calibrates on {cal.windows} x {cal.length} of the "
                             f"'{cal.split}' split, the protocol on {expected[0]} x {expected[1]} of 'calib': "
                             "make them agree, so the bench measures what `graphopt convert` writes")

    def _peer(self, spec: dict, built: Built, where: str) -> Built:
        """The peer tool on `built`'s model, saved to a file first; its seconds are the tool's own
        (reading the float file and writing its model included: the tools need both)."""
        tool = peer(spec.get("name", ""), where)
        if reason := missing_package(tool.package):
            raise Skipped(reason)
        source = built.model
        with tempfile.TemporaryDirectory(prefix="graphopt-bench-peer-") as tmp:
            src = source.replace(source=None).save(Path(tmp) / "fp32" / "model.onnx")
            out = Path(tmp) / "peer" / "model.onnx"
            out.parent.mkdir()
            start = time.perf_counter()
            try:
                tool.write(src, out, self.ctx.calibration(source, self.table.calibration), dict(spec.get("options") or {}))
            except Exception as exc:  # a peer that fails on this model is a finding, not a crash of the run
                raise Skipped(f"{spec['name']} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
            seconds = time.perf_counter() - start
            model = Model.from_onnx(load_onnx(out), name=source.name, task=source.task)
        model = model.replace(tokenizer=source.tokenizer, sample_inputs=source.sample_inputs)
        return Built(model, built.seconds + seconds, built.stats, built.extra)


def _recipe(name: str, where: str):
    path = ROOT / "samples" / "recipes" / name
    try:
        return load_recipe(path)
    except RecipeError as exc:
        raise SuiteError(f"{where}: {exc}") from exc


def _passes(entries: list, where: str):
    """Inline passes, validated as a recipe's `passes:` list (file options relative to bench/)."""
    try:
        return parse_recipe(yaml.safe_dump({"passes": entries}), BENCH / "suites.yaml")
    except RecipeError as exc:
        raise SuiteError(f"{where}: {exc}") from exc
