"""The backend contract: `emit(model, out_dir) -> Artifact` and `validate(artifact, model)`; a registry.

A decoder Model (one with a `DecoderSpec`) reaches a backend as one call: the backend emits each
of its graphs (`decoder_graphs`: portable form prefill + decode, ort form one graph), sharing
weights and encodings, and validates them together on a prefill and decode steps
(`decoder_steps`), the way generation runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from graphopt.errors import BackendError, GraphoptError
from graphopt.ir import Model
from graphopt.ir.model import synthesized_feeds
from graphopt.pipeline.options import Options

__all__ = ["Backend", "Artifact", "BACKENDS", "register_backend", "validation_feeds", "paired_outputs", "require_portable",
           "decoder_graphs", "decoder_steps", "DECODE_STEPS"]

DECODE_STEPS = 4  # decode steps a decoder's validation runs after its prefill

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


def require_portable(spec, backend: str, name: str) -> None:
    """Refuse, for `backend` (a target of standard ops and static shapes), a decoder in the ort form
    (its com.microsoft GroupQueryAttention and dynamic cache shapes are ONNX Runtime's alone) or with
    an int8 cache (`quantize_kv`: these packages take the cache as float tensors so far)."""
    if spec.form != "portable":
        raise BackendError(f"backend '{backend}': decoder '{name}' is in the '{spec.form}' form, whose "
                           "com.microsoft GroupQueryAttention and dynamic cache shapes no NPU toolchain takes; "
                           "build the decoder with attention: portable (recipe decoder: section, or "
                           "graphopt.load(..., decoder={'attention': 'portable'})) for a static cache")
    if spec.cache_dtype != "float32":
        raise BackendError(f"backend '{backend}': decoder '{name}' keeps its KV cache as {spec.cache_dtype} codes "
                           f"(quantize_kv); {backend} packages take the cache as float32 inputs and outputs so far: "
                           "build the decoder without quantize_kv (ort-mobile runs the int8 cache)")


def decoder_graphs(model: Model, *, log=None):
    """The graphs of a decoder Model (`graphopt.lowering.decoder.DecoderGraphs`), None for any other model."""
    from graphopt.ir.decoder import DecoderSpec

    if DecoderSpec.of(model) is None:
        return None
    from graphopt.lowering.decoder import DecoderGraphs

    return DecoderGraphs.of(model, log=log or (lambda *_: None))


def decoder_steps(spec, reference: dict, candidate: dict, model: Model,
                  steps: int = DECODE_STEPS) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(step, reference logits, candidate logits) for a prefill and `steps` decode steps of two
    sets of sessions of a decoder's graphs (file name -> object with onnxruntime's `run`; the ort
    form's also IOBinding), each with its own cache. The prompt is the model's first sample input's
    tokens (cut to leave room for the steps); both are fed the reference's greedy tokens, so one
    early difference does not hide the steps after it.
    """
    from graphopt.evaluation.generation import Decoding

    feeds, _ = validation_feeds(model)
    prompt = np.asarray(feeds[0]["input_ids"]).reshape(-1)[:max(1, spec.capacity - steps)]
    length = prompt.size + steps
    ours, theirs = Decoding(spec, reference, length), Decoding(spec, candidate, length)

    def step(label: str, ids) -> tuple[str, np.ndarray, np.ndarray]:
        expected = ours.feed(ids)
        try:
            return label, expected, theirs.feed(ids)
        except BackendError:
            raise
        except Exception as exc:  # Decoding's named error, or onnxruntime's own types: the graphs do not take the feeds
            reason = str(exc) if isinstance(exc, GraphoptError) else f"{type(exc).__name__}: {exc}"
            raise BackendError(f"decoder '{model.name}': the backend's graphs fail the {label} step: "
                               f"{reason[:300]}") from exc

    pairs = [step("prefill", prompt)]
    for index in range(steps):
        pairs.append(step(f"decode {index + 1}", [int(np.argmax(pairs[-1][1][-1]))]))
    return pairs
