"""Frontends: load() turns an ONNX file, a Hugging Face folder, a GGUF file, an nn.Module or a
bundled sample into a Model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import ModelLoadError
from graphopt.frontends.huggingface import from_hf
from graphopt.frontends.torch_module import from_module
from graphopt.ir import Model
from graphopt.ir.onnx_files import load_onnx

__all__ = ["load", "from_module", "from_hf"]


def load(source: Any, example_inputs: dict[str, np.ndarray] | None = None, *,
         dynamic_axes: dict[str, dict[int, str]] | None = None, task: str | None = None,
         name: str | None = None, form: str = "fx", log=print) -> Model:
    """Load a model from any supported source.

    - `"sample:NAME"`: a bundled sample (see `graphopt.frontends.samples`); `form="onnx"` loads it lowered
    - a path to an `.onnx` file (external data allowed only inside the model's folder)
    - a path to a Hugging Face folder (config.json + safetensors weights)
    - a path to a `.gguf` file (dequantised to float through transformers)
    - an `nn.Module` with `example_inputs` (name -> array), traced with torch.export
    """
    if isinstance(source, str) and source.startswith("sample:"):
        from graphopt.frontends import samples

        return samples.load_sample(source.split(":", 1)[1], form=form, log=log)
    if not isinstance(source, (str, os.PathLike)):
        if example_inputs is None:
            raise ModelLoadError("loading an nn.Module needs example_inputs (input name -> array)")
        return from_module(source, example_inputs, dynamic_axes=dynamic_axes, task=task or "generic",
                           name=name or type(source).__name__)
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_dir():
        return from_hf(path, log=log, name=name)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        proto = load_onnx(path)
        model = Model.from_onnx(proto, source=path, name=name or path.stem)
        model.task = task or _guess_task([o.name for o in model.outputs])
        return model
    if suffix == ".gguf":
        return from_hf(path.parent, gguf_file=path.name, log=log, name=name or path.stem)
    raise ModelLoadError(
        f"{path}: unsupported model file (expected .onnx, .gguf, a Hugging Face folder, or 'sample:NAME')"
    )


def _guess_task(output_names: list[str]) -> str:
    if output_names and output_names[0] == "logits":
        return "causal-lm"
    if output_names and output_names[0] in ("embedding", "sentence_embedding"):
        return "embedding"
    return "generic"
