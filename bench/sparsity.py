"""Sparsity on SmolLM2: magnitude vs Wanda vs SparseGPT at 50 % unstructured and 2:4, then structural removal.

    python bench/sparsity.py [--json PATH] [--skip-structure] [--methods magnitude,wanda,sparsegpt]

Protocol (issue 5): every Linear but lm_head/embedding, 24 evaluation windows × 128 tokens (odd
pydoc topics), calibration 16 windows × 128 tokens (even topics; `--calib-windows`), overlap@k
against fp32's logits, ppl also as a multiple of our fp32 (the issue's 24.75 used another
tokenisation; its targets are ratios). pass_s is the wall time of the nm_sparsity pass alone, with
the machine's load average beside it. The structural rows come from bench/sparsity_structure.py
(`structure_rows`) when that module is present.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path

import graphopt
from graphopt.errors import GraphoptError
from graphopt.evaluation.lm import benchmark_causal_lm, evaluate_causal_lm
from graphopt.evaluation.tables import markdown_table
from graphopt.files.writing import atomic_write_text
from graphopt.frontends.corpora import lm_windows
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext

COLUMNS = ["ppl", "ppl_x", "overlap@1", "overlap@8", "sparsity", "mean_recon_error", "pass_s", "load"]
PATTERNS = {"50%": {"pattern": "unstructured", "sparsity": 0.5}, "2:4": {"pattern": "2:4"}}


def _structure_module():
    """bench/sparsity_structure.py, imported by path (bench/ is not a package), or None."""
    path = Path(__file__).with_name("sparsity_structure.py")
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("sparsity_structure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module if hasattr(module, "structure_rows") else None


def sparsity_rows(fp32, calib, eval_windows, reference, dense_ppl, *, methods, log) -> list[dict]:
    """One row per (pattern, method): ppl (and × fp32), overlap@1/@8, achieved sparsity, pass time."""
    rows = []
    for label, options in PATTERNS.items():
        for method in methods:
            prune = get_pass("nm_sparsity")(method=method, **options)
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            result = prune.run(fp32.copy(), PassContext(calib=calib, progress=True))
            seconds = time.perf_counter() - start
            load = (load_before + os.getloadavg()[0]) / 2
            log(f"sparsity: {label} {method}: {result.stats['layers_pruned']} weights in {seconds:.1f} s "
                f"(load {load:.1f}); evaluating...")
            row, _ = evaluate_causal_lm(result.model, eval_windows, reference)
            rows.append({"name": f"{label} {method}", **row, "ppl_x": row["ppl"] / dense_ppl,
                         "sparsity": result.stats["sparsity"], "mean_recon_error": result.stats["mean_recon_error"],
                         "pass_s": seconds, "load": load, "layers": result.stats["layers"]})
            del result
            gc.collect()
    return rows


def run(*, windows: int, calib_windows: int, length: int, methods: list[str], structure: bool, log) -> dict:
    fp32 = graphopt.load("sample:smollm2", form="onnx", log=log)
    eval_windows = lm_windows(fp32.tokenizer, "eval", windows, length)
    calib = [{"input_ids": w} for w in lm_windows(fp32.tokenizer, "calib", calib_windows, length)]
    module = _structure_module() if structure else None
    log(f"sparsity: fp32 on {windows} x {length} eval tokens...")
    if module is not None:  # the structural rows compare params, bytes and latency with fp32's
        dense, reference = benchmark_causal_lm(fp32, eval_windows, latency_seq=length)
    else:
        dense, reference = evaluate_causal_lm(fp32, eval_windows)
    rows = [{"name": "fp32", **dense, "ppl_x": 1.0, "sparsity": 0.0}]
    rows += sparsity_rows(fp32, calib, eval_windows, reference, dense["ppl"], methods=methods, log=log)
    data = {"model": "smollm2", "protocol": {"eval": [windows, length], "calib": [calib_windows, length],
                                             "skip": list(get_pass("nm_sparsity")().skip), "cpu_count": os.cpu_count()},
            "rows": rows}
    if module is not None:
        structure_rows = module.structure_rows(fp32, calib, eval_windows, reference, log=log)
        if hasattr(module, "add_ratios"):
            module.add_ratios(structure_rows, {"name": "fp32", **dense})
        data["structure"] = {"columns": getattr(module, "COLUMNS", None), "rows": structure_rows}
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--skip-structure", action="store_true", help="omit bench/sparsity_structure.py's rows")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    try:
        data = run(windows=args.windows, calib_windows=args.calib_windows, length=args.length,
                   methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                   structure=not args.skip_structure, log=log)
    except GraphoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data["command"] = "python bench/sparsity.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(markdown_table(data["rows"], COLUMNS), end="")
    if "structure" in data:
        print()
        print(markdown_table(data["structure"]["rows"], data["structure"]["columns"]), end="")
    if args.json:
        atomic_write_text(args.json, json.dumps(data, indent=2, default=float))
        log(f"sparsity: rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
