"""`graphopt sensitivity MODEL`: rank quantization points by the drop when only each is quantized."""

from __future__ import annotations

import argparse

from graphopt.cli.command import log, register_command

__all__: list[str] = []


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an .onnx/.gguf file, a Hugging Face folder, or sample:NAME")
    parser.add_argument("--prepare", metavar="PASS[,PASS]", default="",
                        help="passes (default options) run before the sweep, e.g. cleanup,rotate: "
                             "rank the points of the model a recipe quantizes")
    parser.add_argument("--windows", type=int, default=2, help="windows the drop is measured on (default 2)")
    parser.add_argument("--calib-windows", type=int, default=8, help="windows the activation ranges come from")
    parser.add_argument("--length", type=int, default=128, help="tokens per window (causal LMs)")
    parser.add_argument("--metric", choices=("kl", "overlap", "ppl"), default="kl",
                        help="drop: mean KL to the float output, 1 - overlap@1, or ppl ratio - 1")
    parser.add_argument("--kinds", choices=("all", "activation", "weight"), default="all")
    parser.add_argument("--top", type=int, default=30, help="rows of the printed table")
    parser.add_argument("--json", metavar="OUT.json", help="write the full ranking here")
    parser.add_argument("--plot", metavar="OUT.png", help="bar chart of the most sensitive points")


def _run(args: argparse.Namespace) -> int:
    from graphopt.analysis.sensitivity import analyze_sensitivity
    from graphopt.cli.command import load_model, source_files, write_output_file
    from graphopt.errors import OptionError
    from graphopt.files.writing import refuse_overwrite
    from graphopt.recipe import Calibration, Recipe

    if args.windows < 1 or args.calib_windows < 1 or args.length < 2 or args.top < 1:
        raise OptionError("sensitivity: --windows, --calib-windows and --top must be >= 1, --length >= 2")
    inputs = source_files(args.model)
    for target in (args.json, args.plot):  # refused before the sweep, not after it
        if target:
            refuse_overwrite(target, inputs)
    model = load_model(args.model, onnx=True)
    model = _prepared(model, [name.strip() for name in args.prepare.split(",") if name.strip()])
    # ranges from the first calib windows; the drop measured on the ones after them
    calibration = Calibration(windows=args.calib_windows + args.windows, length=args.length)
    feeds = Recipe(passes=[], calibration=calibration).calibration_feeds(model) or model.sample_inputs
    if len(feeds) <= args.calib_windows:
        calib, measure = feeds, feeds
    else:
        calib, measure = feeds[:args.calib_windows], feeds[args.calib_windows:]
    measure = _stacked(measure)
    kinds = ("activation", "weight") if args.kinds == "all" else (args.kinds,)
    log(f"sensitivity: {model.name}, ranges from {len(calib)} batches, drop on {len(measure)}")
    report = analyze_sensitivity(model, calib, measure, metric=args.metric, kinds=kinds)
    print(report.markdown(args.top), end="")
    if args.json:
        log(f"sensitivity: ranking written to {write_output_file(args.json, report.save_json, inputs)}")
    if args.plot:
        log(f"sensitivity: plot written to {write_output_file(args.plot, report.plot, inputs)}")
    return 0


def _prepared(model, names: list[str]):
    from graphopt.pipeline import get_pass
    from graphopt.pipeline.passes import PassContext

    for name in names:
        result = get_pass(name)().run(model, PassContext(progress=False))
        log(f"sensitivity: prepared with '{name}'" + ("" if result.changed else f" (no change: {result.stats.get('reason', '')})"))
        model = result.model
    return model


def _stacked(feeds: list[dict]) -> list[dict]:
    """Windows of one shape as one batch: one run per point instead of one per window."""
    import numpy as np

    shapes = {tuple((k, v.shape) for k, v in sorted(f.items())) for f in feeds}
    if len(feeds) < 2 or len(shapes) != 1:
        return feeds
    return [{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}]


register_command("sensitivity", _add_arguments, _run,
                 "rank quantization points (activations, weights) by the drop when only each is quantized")
