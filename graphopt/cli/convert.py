"""`graphopt convert MODEL --recipe R.yaml -o OUT`: run a recipe, write the model, its report and a backend's package."""

from __future__ import annotations

import argparse
from pathlib import Path

from graphopt.cli.command import load_model, log, register_command
from graphopt.errors import GraphoptError, UnsafePathError


def _convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an .onnx/.gguf file, a Hugging Face folder, or sample:NAME")
    parser.add_argument("--recipe", required=True, metavar="R.yaml", help="the recipe: passes, backend, calibration")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for model.onnx, report.json/.md")
    parser.add_argument("--backend", metavar="NAME", help="emit with this backend (overrides the recipe's)")
    parser.add_argument("--no-verify", action="store_true", help="skip per-pass fidelity checks on sample inputs")
    parser.add_argument("--check-every-step", action="store_true",
                        help="check the model with onnx.checker and onnxruntime after every changed step, not only "
                             "at the end (finds the step that made an invalid model)")


def _input_files(source: str) -> set[Path]:
    """The files a model source reads (an ONNX file and its external data), resolved."""
    if source.startswith("sample:"):
        return set()
    path = Path(source).resolve()
    files = {path}
    if path.is_file() and path.suffix.lower() == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader itself
            return files
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add((path.parent / entry.value).resolve())
    return files


def _refuse_overwrite(out: Path, source: str, backend: str | None) -> None:
    """Refuse an output folder where writing would replace the input model or its weights."""
    inputs = _input_files(source)
    for name in ("model.onnx", "model.onnx.data", "report.json", "report.md"):
        if (out / name).resolve() in inputs:
            raise UnsafePathError(
                f"{out}: writing {name} there would overwrite the input model '{source}'; choose another output folder"
            )
    if backend:
        folder = (out / backend).resolve()
        if any(p == folder or folder in p.parents for p in inputs):
            raise UnsafePathError(f"{out / backend}: the backend would write over the input model '{source}'")


def _convert_run(args) -> int:
    import graphopt
    from graphopt.pipeline import Pipeline, available_backends, export
    from graphopt.pipeline.instruments import Checker, default_instruments
    from graphopt.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    backend = args.backend or recipe.backend
    options = recipe.backend_options if backend == recipe.backend else {}
    if args.backend and args.backend not in available_backends():
        raise GraphoptError(f"--backend: unknown backend '{args.backend}' (known: {', '.join(available_backends()) or 'none'})")
    out = Path(args.output)
    _refuse_overwrite(out, args.model, backend)
    log(f"recipe {args.recipe}: {', '.join(p.name for p in recipe.passes) or 'no passes'}"
        + (f", backend {backend}" if backend else ""))

    # A recipe without FX passes would lower at once: load samples in their cached ONNX form.
    model = load_model(args.model, onnx=not any("fx" in p.forms() for p in recipe.passes))
    calib = recipe.calibration_feeds(model)
    if calib:
        log(f"calibration: {len(calib)} feeds from {recipe.calibration.source} ({recipe.calibration.split})")
    instruments = default_instruments(verify=not args.no_verify, log=log)
    if args.check_every_step:
        instruments = [Checker(every_step=True) if isinstance(i, Checker) else i for i in instruments]
    result = Pipeline(recipe.passes, instruments=instruments, log=log).run(model, calib=calib)
    final = result.model
    if final.form == "fx":
        final = graphopt.lower(final, log=log)
    model_path = final.save(out / "model.onnx")
    report_json, report_md = result.report.save(out)
    print(f"model:  {model_path}" + (f" (+ {model_path.name}.data)" if (out / "model.onnx.data").exists() else ""))
    print(f"report: {report_json}, {report_md}")
    print(f"nodes {model.num_nodes():,} -> {final.num_nodes():,}, bytes {model.num_bytes():,} -> {final.num_bytes():,}")
    if backend:
        log(f"export: backend {backend} ...")
        artifact = export(final, backend, out / backend, options)
        print(f"{backend}: " + ", ".join(str(f) for f in artifact.files))
    return 0


register_command("convert", _convert_args, _convert_run, "run a recipe on a model; write model.onnx and a report")
