"""The job behind `make demo`: SmolLM2 through the W8A8 recipe with verification, saved to out/demo/.

Runs samples/recipes/smollm2-w8a8.yaml (cleanup, a Hadamard rotation of the residual stream, then
static W8A8 QDQ with the most sensitive points at 16 bits) as a verified pipeline, prints the per-step report (time, sizes, diff,
fidelity against each step's input) and a fidelity summary on a few evaluation windows, and
writes the model and its report. With a warm export cache it takes about a minute on two CPU
cores; the first run also exports SmolLM2 to ONNX (a few minutes, cached afterwards).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import graphopt
from graphopt.errors import GraphoptError
from graphopt.evaluation.lm import evaluate_causal_lm
from graphopt.evaluation.sizes import disk_bytes
from graphopt.frontends.corpora import lm_windows
from graphopt.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "samples" / "recipes" / "smollm2-w8a8.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 128 tokens")
    args = parser.parse_args(argv)
    try:
        run(args.out, args.windows)
    except GraphoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run(out: Path, windows: int) -> None:
    start = time.perf_counter()
    model = graphopt.load("sample:smollm2", form="onnx")
    print(f"demo: SmolLM2 loaded in {time.perf_counter() - start:.1f} s "
          f"({model.num_params() / 1e6:.1f}M parameters, {model.num_nodes()} nodes)")

    recipe = load_recipe(RECIPE)
    result = graphopt.Pipeline(recipe.passes, verify=True).run(model, calib=recipe.calibration_feeds(model))
    path = result.model.save(out / "smollm2-w8a8.onnx")
    result.report.save(out)
    print()
    print(result.report.to_markdown())
    print(f"demo: model written to {path} (report.json, report.md beside it)")

    eval_windows = lm_windows(model.tokenizer, "eval", windows, 128)
    before, reference = evaluate_causal_lm(model, eval_windows)
    after, _ = evaluate_causal_lm(result.model, eval_windows, reference)
    print(f"\nfidelity on {windows} eval windows x 128 tokens: ppl {before['ppl']:.3f} (fp32) -> "
          f"{after['ppl']:.3f} (W8A8), overlap@1 {after['overlap@1']:.4f}, overlap@8 {after['overlap@8']:.4f}; "
          f"{disk_bytes(model) / 1e6:.1f} MB -> {disk_bytes(result.model) / 1e6:.1f} MB on disk")
    print(f"demo: done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
