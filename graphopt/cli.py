"""The `graphopt` command: passes, backends, inspect, convert, diff (and commands others register).

User errors (any GraphoptError, bad arguments) print one line on stderr and exit with code 2.
Progress goes to stderr; results (tables, JSON) go to stdout, so `--json` output can be piped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from graphopt.errors import GraphoptError, UnsafePathError

__all__ = ["main", "register_command", "Command", "COMMANDS", "load_model", "log"]

EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    """A subcommand: `add_arguments(parser)` declares its arguments, `run(args)` returns an exit code."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def register_command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int | None], help: str = "") -> Command:
    """Add a subcommand to `graphopt`.

    Modules under `graphopt/commands/` are imported when the CLI starts; each calls this at import
    time (keep heavy imports inside `run`, so `graphopt --help` stays fast).
    """
    if name in COMMANDS and COMMANDS[name].run is not run:
        raise TypeError(f"two commands named {name!r}")
    COMMANDS[name] = Command(name, help, add_arguments, run)
    return COMMANDS[name]


def log(message: str) -> None:
    """Progress line on stderr (stdout carries results)."""
    print(message, file=sys.stderr, flush=True)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: argparse's usage dump is noise for a mistyped flag."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def load_model(source: str, *, onnx: bool = False):
    """Load MODEL (a path or sample:NAME) with progress on stderr; in ONNX form when `onnx` is set.

    Samples load their cached ONNX form directly; other FX models are lowered (also cached).
    """
    import graphopt

    start = time.perf_counter()
    log(f"loading {source} ...")
    model = graphopt.load(source, form="onnx" if onnx else "fx", log=log)
    if onnx and model.form == "fx":
        model = graphopt.lower(model, log=log)
    log(f"loaded {model.name} ({model.form.upper()}, {model.num_nodes():,} nodes) in {time.perf_counter() - start:.1f} s")
    return model


# --------------------------------------------------------------------------------- passes
def _describe_fields(cls) -> list[dict]:
    """name, type, default, help of a dataclass's fields (backends have no describe_options)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        from graphopt.pass_infra import _type_name  # Literal options list their values

        tp = hints.get(f.name)
        rows.append({"name": f.name, "type": _type_name(tp) if tp is not None else "None",
                     "default": None if default is dataclasses.MISSING else default,
                     "required": default is dataclasses.MISSING, "help": f.metadata.get("help", "")})
    return rows


def _option_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        default = "required" if row.get("required") or (row["default"] is None and "None" not in row["type"]) else repr(row["default"])
        lines.append(f"    {row['name']}: {row['type']} = {default}" + (f"  — {row['help']}" if row["help"] else ""))
    return lines or ["    (no options)"]


def _first_line(obj) -> str:
    doc = (obj.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _passes_run(args) -> int:
    from graphopt.pipeline import available_passes

    passes = available_passes()
    if args.json:
        print(json.dumps({name: {"forms": list(cls.forms()), "doc": _first_line(cls),
                                 "options": cls.describe_options()} for name, cls in passes.items()}, indent=2, default=str))
        return 0
    if not passes:
        print("no passes registered")
        return 0
    for name, cls in passes.items():
        print(f"{name}  [{', '.join(cls.forms()).upper() or '-'}]  {_first_line(cls)}")
        print("\n".join(_option_lines(cls.describe_options())))
    return 0


def _backends_run(args) -> int:
    from graphopt.pipeline import available_backends

    backends = available_backends()
    if args.json:
        print(json.dumps({name: {"doc": _first_line(cls), "options": _describe_fields(cls)}
                          for name, cls in backends.items()}, indent=2, default=str))
        return 0
    if not backends:
        print("no backends registered")
        return 0
    for name, cls in backends.items():
        print(f"{name}  {_first_line(cls)}")
        print("\n".join(_option_lines(_describe_fields(cls))))
    return 0


# -------------------------------------------------------------------------------- inspect
def _inspect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an .onnx/.gguf file, a Hugging Face folder, or sample:NAME")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--form", choices=("fx", "onnx"),
                        help="IR form to inspect: onnx lowers an FX model (cached); default: ONNX for "
                             "samples (their cached deploy form), otherwise the form the model loads in")


def _inspect_run(args) -> int:
    from graphopt.summary import summarize, to_markdown

    form = args.form or ("onnx" if args.model.startswith("sample:") else None)
    model = load_model(args.model, onnx=form == "onnx")
    if form == "fx" and model.form != "fx":
        raise GraphoptError(f"{args.model} loads as ONNX; there is no ONNX -> FX path (drop --form fx)")
    summary = summarize(model)
    print(json.dumps(summary, indent=2, default=str) if args.json else to_markdown(summary), end="\n" if args.json else "")
    return 0


# -------------------------------------------------------------------------------- convert
def _convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an .onnx/.gguf file, a Hugging Face folder, or sample:NAME")
    parser.add_argument("--recipe", required=True, metavar="R.yaml", help="the recipe: passes, backend, calibration")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for model.onnx, report.json/.md")
    parser.add_argument("--backend", metavar="NAME", help="emit with this backend (overrides the recipe's)")
    parser.add_argument("--no-verify", action="store_true", help="skip per-pass fidelity checks on sample inputs")


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
    result = Pipeline(recipe.passes, verify=not args.no_verify, log=log).run(model, calib=calib)
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


# ----------------------------------------------------------------------------------- diff
def _diff_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="the model before (path or sample:NAME)")
    parser.add_argument("b", metavar="B", help="the model after (path or sample:NAME)")
    parser.add_argument("--json", action="store_true", help="print the full diff as JSON")


def _diff_run(args) -> int:
    from graphopt.diffing import diff_models

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


register_command("passes", _json_flag, _passes_run, "list passes: name, IR forms, options")
register_command("backends", _json_flag, _backends_run, "list backends and their options")
register_command("inspect", _inspect_args, _inspect_run, "ops, parameters, bytes, signature, quantization/sparsity")
register_command("convert", _convert_args, _convert_run, "run a recipe on a model; write model.onnx and a report")
register_command("diff", _diff_args, _diff_run, "structural difference between two models")


# ----------------------------------------------------------------------------------- main
def _load_extensions() -> None:
    """Import `graphopt.commands.*` so the commands they register join the parser."""
    try:
        importlib.import_module("graphopt.commands")
    except ModuleNotFoundError as exc:
        if exc.name != "graphopt.commands":
            raise


def build_parser() -> argparse.ArgumentParser:
    import graphopt

    parser = _Parser(prog="graphopt", description="Compile models for phones and NPUs: passes, recipes, backends.")
    parser.add_argument("--version", action="version", version=f"graphopt {graphopt.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error)."""
    _load_extensions()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            raise _UsageError(f"graphopt: error: choose a command: {', '.join(COMMANDS)} (see 'graphopt --help')")
        code = COMMANDS[args.command].run(args)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except (_UsageError, GraphoptError, OSError) as exc:  # OSError: an unwritable or vanished path
        message = " ".join(str(exc).split("\n"))
        print(message if isinstance(exc, _UsageError) else f"graphopt: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
