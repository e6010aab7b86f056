"""Where W8A8 loses on SmolLM2: the fake-quant model with one group of quantizers switched on at a time.

    python bench/qat_budget.py [--weight-rounding rtn|gptq] [--windows 24] [--json PATH] [--model sample:smollm2]

The model is what QAT starts from (bench/qat.py's rotated model, the fake_quantize pass at W8A8:
uint8 per-channel weights, MSE-initialised per-tensor activations, the 15 % most sensitive points
of samples/recipes/smollm2-rotated-sensitivity.json at 16 bits, the final-norm gain matrix at 16
bits), run in torch on the 24 evaluation windows. Each row keeps only the named quantizers on
(`FakeQuant.enabled`), so the rows say which quantizers cost what overlap@1 against fp32. With
GPTQ the weights themselves are GPTQ-rounded, so rows with weight quantizers off still carry it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import graphopt
from graphopt.evaluation.lm import evaluate_causal_lm
from graphopt.evaluation.tables import environment, markdown_table
from graphopt.files.writing import atomic_write_text
from graphopt.frontends.corpora import lm_windows
from graphopt.passes.rotate import gain_matrices
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext
from graphopt.training import fake_quant

ROOT = Path(__file__).resolve().parents[1]
SENSITIVITY = ROOT / "samples" / "recipes" / "smollm2-rotated-sensitivity.json"
COLUMNS = ["ppl", "overlap@1", "overlap@8"]


def _groups(tables: set[str]) -> dict:
    """Row name -> which quantizers stay on."""
    weight = lambda m: m.kind == "weight"  # noqa: E731
    table = lambda m: weight(m) and m.name in tables  # noqa: E731
    return {
        "all": lambda m: True,
        "weights only": weight,
        "embedding table only": table,
        "all but the embedding table": lambda m: not table(m),
        "activations only": lambda m: not weight(m),
        "8-bit activations only": lambda m: not weight(m) and m.spec.qmax <= 255,
        "all but down_proj inputs": lambda m: weight(m) or "down_proj" not in m.name,
    }


def run(args, log) -> dict:
    fx = graphopt.load(args.model, log=log)
    fx = get_pass("rotate")().run(fx, PassContext(progress=False)).model
    eval_windows = lm_windows(fx.tokenizer, "eval", args.windows, args.length)
    calib = [{"input_ids": w} for w in lm_windows(fx.tokenizer, "calib", 16, args.length)]
    row, reference = evaluate_causal_lm(fx, eval_windows)  # an FX model runs in torch
    rows = [{"name": "none (fp32)", **row}]
    student = fx.copy()
    get_pass("fake_quantize")(weight_bits=8, weight_symmetric=False, activation_bits=8, int16_budget=0.15,
                              sensitivity=str(SENSITIVITY), int16_weights=gain_matrices(fx), observer="mse",
                              weight_rounding=args.weight_rounding).run(student, PassContext(calib=calib, progress=False))
    modules = fake_quant.fake_quant_modules(student).values()
    for name, keep in _groups(fake_quant.table_weights(student)).items():
        for module in modules:
            module.enabled = keep(module)
        log(f"qat budget: {name}...")
        row, _ = evaluate_causal_lm(student, eval_windows, reference)
        rows.append({"name": name, **row})
    return {"model": args.model, "weight_rounding": args.weight_rounding, "windows": args.windows,
            "length": args.length, "rows": rows,
            "machine": environment()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weight-rounding", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--model", default="sample:smollm2")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    data = run(args, log)
    data["command"] = "python bench/qat_budget.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(markdown_table(data["rows"], COLUMNS), end="")
    if args.json:
        atomic_write_text(args.json, json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
