"""Finding passes and backends by name (their packages register them on import), and export()."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from graphopt.errors import PipelineError
from graphopt.ir import Model
from graphopt.pipeline.backends import BACKENDS, Artifact
from graphopt.pipeline.passes import PASSES, Pass

__all__ = ["import_members", "available_passes", "get_pass", "available_backends", "get_backend", "export"]


def import_members(package: str, path, namespace: dict) -> list[str]:
    """Import every module of `package` (at `path`), which registers the passes or backends they
    define, and put each module's public names (its `__all__`) into `namespace`; the names."""
    names = []
    for info in pkgutil.iter_modules(path):
        module = importlib.import_module(f"{package}.{info.name}")
        for name in getattr(module, "__all__", ()):
            namespace[name] = getattr(module, name)
            names.append(name)
    return names


def available_passes() -> dict[str, type[Pass]]:
    """The pass registry, filled by importing the `graphopt.passes` package."""
    importlib.import_module("graphopt.passes")
    return dict(sorted(PASSES.items()))


def get_pass(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        raise PipelineError(f"unknown pass '{name}' (known: {', '.join(passes)})")
    return passes[name]


def available_backends() -> dict:
    """The backend registry, filled by importing the `graphopt.backends` package."""
    importlib.import_module("graphopt.backends")
    return dict(sorted(BACKENDS.items()))


def get_backend(name: str):
    backends = available_backends()
    if name not in backends:
        raise PipelineError(f"unknown backend '{name}' (known: {', '.join(backends) or 'none'})")
    return backends[name]


def export(model: Model, backend: str, out_dir: str | Path, options: dict | None = None, *,
           validate: bool = True, force: bool = False) -> Artifact:
    """Emit `model` with the named backend into `out_dir`, then validate the artifact.

    An FX model is lowered first (backends read the ONNX form only). The package is written as one
    output set (`graphopt.files.writing.OutputSet`); `force` allows a folder holding other files.
    """
    emitter = get_backend(backend).from_options(options)
    if model.form == "fx":
        from graphopt.lowering import lower

        model = lower(model)
    artifact = emitter.emit(model, Path(out_dir), force=force)
    if validate:
        artifact.validation = emitter.validate(artifact, model)
    return artifact
