"""Fidelity of pipelines on SmolLM2 next to fp32: ppl, overlap@1/@8, bytes on disk, ORT latency.

    python bench/fidelity.py [PIPELINE ...] [--json PATH]

A PIPELINE is `fp32` (the lowered model, always measured first as the reference), a recipe
file (`samples/recipes/cleanup.yaml`), or pass names joined by commas (`cleanup`,
`cleanup,quantize`). Default: `fp32 cleanup`. Protocol: 24 evaluation windows of 128 tokens
(`lm_windows(tok, "eval", 24, 128)`, odd pydoc topics), overlap@k against fp32's logits,
latency of one batch-1 run at sequence length 128 on onnxruntime CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from pathlib import Path

import graphopt
from graphopt.errors import GraphoptError
from graphopt.evaluation.lm import benchmark_causal_lm
from graphopt.evaluation.tables import environment, markdown_table
from graphopt.files.writing import atomic_write_text
from graphopt.frontends.corpora import lm_windows

COLUMNS = ["ppl", "overlap@1", "overlap@8", "bytes", "latency_ms", "latency_min_ms", "pipeline_s"]


def build_pipeline(spec: str):
    """(passes, calibration feeds factory) for a recipe path or comma-joined pass names."""
    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        from graphopt.recipe import load_recipe

        recipe = load_recipe(spec)
        return recipe.passes, recipe.calibration_feeds
    from graphopt.pipeline import get_pass

    passes = [get_pass(name.strip())() for name in spec.split(",") if name.strip()]
    if not passes:
        raise GraphoptError(f"pipeline '{spec}' names no pass")
    # pass names carry no calibration section: give passes that calibrate the usual 8 windows
    calib = lambda model: [{model.inputs[0].name: w} for w in lm_windows(model.tokenizer, "calib", 8, 128)]
    return passes, calib


class Models:
    """The SmolLM2 sample in each form, loaded once and only when a pipeline needs it."""

    def __init__(self, log):
        self.log = log
        self._onnx = None
        self._fx = None

    def onnx(self):
        if self._onnx is None:
            start = time.perf_counter()
            self._onnx = graphopt.load("sample:smollm2", form="onnx", log=self.log)
            self.log(f"fidelity: SmolLM2 ONNX form ready in {time.perf_counter() - start:.1f} s")
        return self._onnx

    def start_for(self, passes):
        """Pipelines whose first pass has no ONNX form start from the FX form."""
        if passes and "onnx" not in passes[0].forms():
            if self._fx is None:
                self._fx = graphopt.load("sample:smollm2", log=self.log)
            return self._fx
        return self.onnx()


def run(specs: list[str], *, windows: int, length: int, latency_repeats: int, threads: int, log) -> dict:
    models = Models(log)
    fp32 = models.onnx()
    eval_windows = lm_windows(fp32.tokenizer, "eval", windows, length)
    log(f"fidelity: fp32 on {windows} x {length} eval tokens...")
    row, reference = benchmark_causal_lm(
        fp32, eval_windows, latency_seq=length, latency_repeats=latency_repeats, threads=threads)
    rows = [{"name": "fp32", **row, "pipeline_s": 0.0}]
    for spec in specs:
        if spec == "fp32":
            continue
        passes, calibration = build_pipeline(spec)
        start_model = models.start_for(passes)
        start = time.perf_counter()
        result = graphopt.Pipeline(passes, verify=False, progress=False, log=log).run(
            start_model, calib=calibration(start_model))
        seconds = time.perf_counter() - start
        model = result.model if result.model.form == "onnx" else graphopt.lower(result.model, log=log)
        log(f"fidelity: {spec} on {windows} x {length} eval tokens...")
        row, _ = benchmark_causal_lm(
            model, eval_windows, reference, latency_seq=length, latency_repeats=latency_repeats, threads=threads)
        rows.append({"name": spec, **row, "pipeline_s": seconds,
                     "steps": [{"name": s.name, "seconds": s.seconds, "nodes": list(s.nodes), "stats": s.stats}
                               for s in result.report.steps]})
        del result, model
        gc.collect()
    return {
        "model": "smollm2",
        "protocol": {"split": "eval", "windows": windows, "length": length, "reference": "fp32",
                     "latency": {"seq": length, "batch": 1, "repeats": latency_repeats,
                                 "threads": threads or "ort default"}},
        "machine": environment(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipelines", nargs="*", default=["fp32", "cleanup"],
                        help="fp32, a recipe .yaml, or comma-joined pass names")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT decides)")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    try:
        data = run(args.pipelines, windows=args.windows, length=args.length,
                   latency_repeats=args.latency_repeats, threads=args.threads, log=log)
    except GraphoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data["command"] = "python bench/fidelity.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(markdown_table(data["rows"], COLUMNS), end="")
    if args.json:
        atomic_write_text(args.json, json.dumps(data, indent=2))
        log(f"fidelity: rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
