"""`graphopt convert MODEL --recipe R.yaml -o OUT`: run a recipe, write the model, its report and a backend's package.

A recipe with a `decoder:` section builds a decoder with a KV cache from MODEL, calibrates it on
prefills, and writes a decoder folder (graphs, decoder.json, tokenizer; see
`graphopt.frontends.decoder_folder`) that `graphopt generate OUT` runs; an (ort-form) decoder folder
as MODEL gives a decoder folder too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graphopt.cli.command import load_model, log, register_command, source_files
from graphopt.errors import GraphoptError, UnsafePathError
from graphopt.files.writing import OutputSet, foreign_files, refuse_overwrite


def _convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an .onnx/.gguf file, a Hugging Face folder, or sample:NAME")
    parser.add_argument("--recipe", required=True, metavar="R.yaml", help="the recipe: passes, backend, calibration")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for model.onnx, report.json/.md")
    parser.add_argument("--backend", metavar="NAME", help="emit with this backend (overrides the recipe's)")
    parser.add_argument("--no-verify", action="store_true", help="skip per-pass fidelity checks on sample inputs")
    parser.add_argument("--allow-file", action="append", default=[], metavar="PATH",
                        help="a file the recipe may name outside its own folder (repeatable); recipe file options "
                             "(sensitivity, encodings, scores) are otherwise confined to the recipe's folder")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that holds files graphopt did not write (inputs are never replaced)")
    parser.add_argument("--calibration", action="append", metavar="SOURCE",
                        help="calibrate from SOURCE instead of the recipe's sources (repeat to mix): a .txt, .jsonl, "
                             ".npz or .npy file, a folder of .txt files or images, or sample:pydoc-topics / sample:lee-news")
    parser.add_argument("--calibration-windows", type=int, metavar="N", help="feeds in all (windows, batches, images)")
    parser.add_argument("--calibration-length", type=int, metavar="L", help="tokens per text window")
    parser.add_argument("--calibration-field", metavar="NAME", help="the text field of JSONL sources (default: text)")
    parser.add_argument("--calibration-image-spec", metavar="SPEC.yaml",
                        help="image preprocessing: size, resize, layout, colors, scale, mean, std, dtype, input")
    parser.add_argument("--check-every-step", action="store_true",
                        help="check the model with onnx.checker and onnxruntime after every changed step, not only "
                             "at the end (finds the step that made an invalid model)")


_DECODER_FILES = ("prefill.onnx", "decode.onnx", "weights.data", "decoder.json", "genai_config.json")


def _refuse_overwrite(out: Path, inputs: list[Path], backend: str | None, decoder: bool = False) -> None:
    """Refuse, before any work, an output folder where a file of the result would replace an input
    (a decoder folder also holds tokenizer files: it may not be the folder of an input)."""
    for name in ("model.onnx", "model.onnx.data", "report.json", "report.md", *(_DECODER_FILES if decoder else ())):
        refuse_overwrite(out / name, inputs)
    if decoder and any(p.resolve().parent == out.resolve() for p in inputs):
        raise UnsafePathError(f"{out}: a decoder folder holds tokenizer files, which would replace the input's; "
                              "write it to another folder")
    if backend:
        folder = (out / backend).resolve()
        if any(folder == p.resolve() or folder in p.resolve().parents for p in inputs):
            raise UnsafePathError(f"{out / backend}: the backend would write over the input '{inputs[0]}'")


def _convert_run(args) -> int:
    import graphopt
    from graphopt.frontends.calibration import command_line_spec
    from graphopt.frontends.decoder_folder import is_decoder_folder
    from graphopt.pipeline import Pipeline, available_backends, export
    from graphopt.pipeline.instruments import Checker, default_instruments
    from graphopt.recipe import load_recipe

    recipe = load_recipe(args.recipe, trusted_files=args.allow_file)
    calibration = command_line_spec(recipe.calibration, args.calibration, args.calibration_windows,
                                    args.calibration_length, args.calibration_field, args.calibration_image_spec)
    backend = args.backend or recipe.backend
    options = recipe.backend_options if backend == recipe.backend else {}
    if args.backend and args.backend not in available_backends():
        raise GraphoptError(f"--backend: unknown backend '{args.backend}' (known: {', '.join(available_backends()) or 'none'})")
    out = Path(args.output)
    inputs = source_files(args.model)
    # a decoder folder converts to a decoder folder (a lone model.onnx of it would not generate)
    decoder = recipe.decoder is not None or is_decoder_folder(Path(args.model))
    _refuse_overwrite(out, inputs, backend, decoder=decoder)
    if not args.force:
        strangers = foreign_files(out)
        if strangers:
            raise UnsafePathError(f"{out}: holds files graphopt did not write ('{strangers[0]}'); choose an empty or "
                                  "new folder, or pass --force to write beside them (inputs are never overwritten)")
    log(f"recipe {args.recipe}: {', '.join(p.name for p in recipe.passes) or 'no passes'}"
        + (f", backend {backend}" if backend else ""))

    # A recipe without FX passes would lower at once: load samples in their cached ONNX form.
    model = load_model(args.model, onnx=not any("fx" in p.forms() for p in recipe.passes), decoder=recipe.decoder)
    calib = calibration.feeds(model) if calibration else None
    if calib:
        log(f"calibration: {len(calib)} feeds from {calibration.source}")
    passes = recipe.passes
    if calib and not model.sample_inputs:  # the per-step fidelity check runs on the first calibration feed
        model.sample_inputs = calib[:1]
    instruments = default_instruments(verify=not args.no_verify, log=log)
    if args.check_every_step:
        instruments = [Checker(every_step=True) if isinstance(i, Checker) else i for i in instruments]
    result = Pipeline(passes, instruments=instruments, log=log).run(model, calib=calib)
    final = result.model
    if final.form == "fx":
        final = graphopt.lower(final, log=log)
    if decoder:
        _write_decoder(final, result.report, out, inputs, args.force)
    else:
        with OutputSet(out, inputs=inputs, force=args.force) as output:  # model and reports as one set
            written = final.write(output.path("model.onnx"))
            result.report.save(output.staging)
        print(f"model:  {out / 'model.onnx'}" + (" (+ model.onnx.data)" if len(written) > 1 else ""))
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")
    print(f"nodes {model.num_nodes():,} -> {final.num_nodes():,}, bytes {model.num_bytes():,} -> {final.num_bytes():,}")
    if backend:
        log(f"export: backend {backend} ...")
        artifact = export(final, backend, out / backend, options, force=args.force)
        print(f"{backend}: " + ", ".join(str(f) for f in artifact.files))
    return 0


def _write_decoder(model, report, out: Path, inputs: list[Path], force: bool) -> None:
    """The decoder folder and the reports, as one output set."""
    from graphopt.frontends.decoder_folder import write_decoder
    from graphopt.lowering.decoder import DecoderGraphs

    graphs = DecoderGraphs.of(model, log=log)
    with OutputSet(out, inputs=inputs, force=force) as output:
        staged = write_decoder(graphs, model.tokenizer, output)
        report.save(output.staging)
    print(f"decoder: {out} ({', '.join(p.name for p in staged)}); run it with `graphopt generate {out} --prompt ...`")


register_command("convert", _convert_args, _convert_run, "run a recipe on a model; write model.onnx and a report")
