"""`graphopt inspect MODEL`: ops, parameters, bytes, signature, quantization and sparsity status."""

from __future__ import annotations

import argparse
import json

from graphopt.cli.command import load_model, register_command
from graphopt.errors import GraphoptError


def _inspect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an .onnx/.gguf file, a Hugging Face folder, or sample:NAME")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--form", choices=("fx", "onnx"),
                        help="IR form to inspect: onnx lowers an FX model (cached); default: ONNX for "
                             "samples (their cached deploy form), otherwise the form the model loads in")


def _inspect_run(args) -> int:
    from graphopt.analysis.inspect import summarize, to_markdown

    form = args.form or ("onnx" if args.model.startswith("sample:") else None)
    model = load_model(args.model, onnx=form == "onnx")
    if form == "fx" and model.form != "fx":
        raise GraphoptError(f"{args.model} loads as ONNX; there is no ONNX -> FX path (drop --form fx)")
    summary = summarize(model)
    print(json.dumps(summary, indent=2, default=str) if args.json else to_markdown(summary), end="\n" if args.json else "")
    return 0


register_command("inspect", _inspect_args, _inspect_run, "ops, parameters, bytes, signature, quantization/sparsity")
