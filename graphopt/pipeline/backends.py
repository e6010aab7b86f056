"""The backend contract: `emit(model, out_dir) -> Artifact` and `validate(artifact, model)`; a registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from graphopt.ir import Model
from graphopt.ir.model import synthesized_feeds
from graphopt.pipeline.options import Options

__all__ = ["Backend", "Artifact", "BACKENDS", "register_backend", "validation_feeds", "paired_outputs"]

BACKENDS: dict[str, type["Backend"]] = {}


@dataclass
class Artifact:
    """Files a backend wrote, the main one first, plus what validation found."""

    backend: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)


def register_backend(cls: type["Backend"]) -> type["Backend"]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    BACKENDS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Backend(Options):
    """Base class: a frozen dataclass whose fields are the backend's options.

    Subclasses set `name`, implement `emit` (write the package for the ONNX form as one
    `graphopt.files.writing.OutputSet` into `out_dir`: whole or not at all, never over the model's
    source; `force` allows a folder that holds other files) and `validate` (prove the files work: run
    them or rebuild and compare; return a dict of findings and raise BackendError when they do not
    hold).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "backend"

    def emit(self, model: Model, out_dir: Path, *, force: bool = False) -> Artifact:
        raise NotImplementedError

    def validate(self, artifact: Artifact, model: Model) -> dict:
        raise NotImplementedError


def validation_feeds(model: Model, *, dynamic_dim: int = 8) -> tuple[list[dict[str, np.ndarray]], str]:
    """Feeds a backend validates its artifact on, and where they came from.

    The model's sample inputs when it has them ("sample_inputs", or "synthesized" when the loader
    made them); otherwise one batch built from the input specs (`graphopt.ir.model.synthesized_feeds`).
    """
    if model.sample_inputs:
        return list(model.sample_inputs), model.meta.extra.get("sample_inputs", "sample_inputs")
    return [synthesized_feeds(model.inputs, dynamic_dim=dynamic_dim)], "synthesized"


def paired_outputs(reference, candidate, feeds_list: list[dict[str, np.ndarray]],
                   output_names: list[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(output name, reference value, candidate value) for each output of each batch, from two
    onnxruntime sessions fed the same inputs: what a backend's `validate` compares."""
    names = [i.name for i in reference.get_inputs()]
    for feeds in feeds_list:
        batch = {n: feeds[n] for n in names}
        yield from zip(output_names, reference.run(None, batch), candidate.run(None, batch))
