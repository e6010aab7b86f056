"""`graphopt diff A B`: the structural difference between two models."""

from __future__ import annotations

import argparse
import json

from graphopt.cli.command import load_model, log, register_command


def _diff_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="the model before (path or sample:NAME)")
    parser.add_argument("b", metavar="B", help="the model after (path or sample:NAME)")
    parser.add_argument("--json", action="store_true", help="print the full diff as JSON")


def _diff_run(args) -> int:
    from graphopt.analysis.diff import diff_models

    # Beside an ONNX file, a sample loads in its (cached) ONNX form rather than being traced.
    onnx_side = any(source.lower().endswith(".onnx") for source in (args.a, args.b))
    a, b = load_model(args.a, onnx=onnx_side), load_model(args.b, onnx=onnx_side)
    if a.form != b.form:  # compare like with like: there is no ONNX -> FX path, so lower
        import graphopt

        log("forms differ: lowering the FX model to ONNX")
        a, b = (graphopt.lower(m, log=log) if m.form == "fx" else m for m in (a, b))
    diff = diff_models(a, b)
    print(json.dumps(diff.to_json(), indent=2, default=str) if args.json else diff.to_markdown())
    return 0


register_command("diff", _diff_args, _diff_run, "structural difference between two models")
