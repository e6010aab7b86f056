"""The command registry, and what every `graphopt` command shares: progress on stderr, loading MODEL."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["Command", "COMMANDS", "register_command", "log", "load_model", "source_files", "write_output_file"]


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

    Modules of `graphopt.cli` are imported when the CLI starts; each calls this at import time
    (keep heavy imports inside `run`, so `graphopt --help` stays fast).
    """
    if name in COMMANDS and COMMANDS[name].run is not run:
        raise TypeError(f"two commands named {name!r}")
    COMMANDS[name] = Command(name, help, add_arguments, run)
    return COMMANDS[name]


def log(message: str) -> None:
    """Progress line on stderr (stdout carries results)."""
    print(message, file=sys.stderr, flush=True)


def load_model(source: str, *, onnx: bool = False, decoder=None):
    """Load MODEL (a path or sample:NAME) with progress on stderr; in ONNX form when `onnx` is set;
    with `decoder` (DecoderOptions), the decoder with a KV cache built from it.

    Samples load their cached ONNX form directly; other FX models are lowered (also cached).
    """
    import graphopt

    start = time.perf_counter()
    log(f"loading {source} ...")
    model = graphopt.load(source, form="onnx" if onnx else "fx", decoder=decoder, log=log)
    if onnx and model.form == "fx":
        model = graphopt.lower(model, log=log)
    log(f"loaded {model.name} ({model.form.upper()}, {model.num_nodes():,} nodes) in {time.perf_counter() - start:.1f} s")
    return model


def source_files(source: str) -> list[Path]:
    """The files a MODEL argument reads, which no output may replace: an ONNX file and every
    external-data file it names, a GGUF file, every file of a Hugging Face folder."""
    if source.startswith("sample:"):
        return []
    path = Path(source)
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    if path.suffix.lower() == ".onnx" and path.is_file():
        from graphopt.ir.onnx_files import referenced_files

        return [path, *referenced_files(path)]
    return [path]


def write_output_file(path: str | Path, write: Callable[[Path], None], inputs: list[Path]) -> Path:
    """Write one output file the user named (`--json`, `--plot`, `--save`): through `write(staged)`,
    renamed into place whole, refused when it would replace one of `inputs`."""
    from graphopt.files.writing import OutputSet

    path = Path(path)
    with OutputSet(path.parent, inputs=inputs, force=True, manifest=False) as out:
        write(out.path(path.name))
    return path
