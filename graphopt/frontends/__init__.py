"""Frontends: load() turns an ONNX file, a Hugging Face folder, a GGUF file, an nn.Module or a
bundled sample into a Model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import ModelLoadError, UnsupportedGraphError
from graphopt.frontends.decoder_folder import is_decoder_folder, load_decoder_model
from graphopt.frontends.huggingface import from_hf, load_transformers
from graphopt.frontends.torch_module import from_module
from graphopt.ir import Model
from graphopt.ir.decoder import DecoderSpec
from graphopt.ir.model import synthesized_feeds
from graphopt.ir.onnx_files import load_onnx_mapped

__all__ = ["load", "from_module", "from_hf"]


def load(source: Any, example_inputs: dict[str, np.ndarray] | None = None, *,
         dynamic_axes: dict[str, dict[int, str]] | None = None, task: str | None = None,
         name: str | None = None, form: str = "fx", decoder: Any = None, log=print) -> Model:
    """Load a model from any supported source.

    - `"sample:NAME"`: a bundled sample (see `graphopt.frontends.samples`); `form="onnx"` loads it lowered
    - a path to an `.onnx` file (external data allowed only inside the model's folder)
    - a path to a Hugging Face folder (config.json + safetensors weights)
    - a path to a `.gguf` file (dequantised to float through transformers)
    - an `nn.Module` with `example_inputs` (name -> array), traced with torch.export
    - a decoder folder graphopt wrote (decoder.json; its ort-form graph, see `decoder_folder`)

    `decoder` (True, {"attention": "ort" | "portable", "capacity": N, "prefill_chunk": N} or
    `DecoderOptions`) builds, from a Llama-family causal LM (a sample, a Hugging Face folder, a GGUF
    file or a transformers model), a decoder with a KV cache instead (see `graphopt.frontends.decoder`);
    any other model is refused with an UnsupportedGraphError before anything is built.
    """
    if decoder is not None and decoder is not False:
        return _load_decoder(source, decoder, name=name, form=form, log=log)
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
    if is_decoder_folder(path):
        return load_decoder_model(path)
    if path.is_dir():
        return from_hf(path, log=log, name=name)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        proto, weights = load_onnx_mapped(path)  # external weights are mapped, not read
        model = Model.from_onnx(proto, weights=weights, source=path, name=name or path.stem)
        model.task = task or _guess_task([o.name for o in model.outputs])
        # an ONNX file brings no inputs: fidelity and backends' checks run on a seeded synthetic batch
        model.sample_inputs = [synthesized_feeds(model.inputs)]
        model.meta.extra["sample_inputs"] = "synthesized"
        return model
    if suffix == ".gguf":
        return from_hf(path.parent, gguf_file=path.name, log=log, name=name or path.stem)
    raise ModelLoadError(
        f"{path}: unsupported model file (expected .onnx, .gguf, a Hugging Face folder, or 'sample:NAME')"
    )


def _load_decoder(source: Any, options: Any, *, name: str | None, form: str, log) -> Model:
    """A decoder built from a sample, a Hugging Face folder, a GGUF file or a transformers model."""
    from graphopt.frontends.corpora import lm_windows
    from graphopt.frontends.decoder import DecoderOptions, decoder_feeds, llama_decoder
    from graphopt.lowering import lower

    options = DecoderOptions.from_value(options)
    tokenizer, source_path, window = None, None, None
    if isinstance(source, str) and source.startswith("sample:"):
        from graphopt.frontends import samples

        sample = source.split(":", 1)[1]
        name = name or sample
        if sample == "tiny-llama":
            hf = samples.tiny_llama(log=log)
        elif sample == "smollm2":
            gguf = samples.smollm2_gguf()
            hf, tokenizer, _ = load_transformers(gguf.parent, gguf_file=gguf.name, log=log, name=sample)
        else:
            raise UnsupportedGraphError(f"sample '{sample}' is not a Llama-family decoder (decoder samples: "
                                        "tiny-llama, smollm2)")
        window = 32 if sample == "tiny-llama" else 64  # the plain sample's sample inputs: 2 eval windows
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file or folder")
        if path.is_dir() and not is_decoder_folder(path):
            hf, tokenizer, _ = load_transformers(path, log=log, name=name)
        elif path.suffix.lower() == ".gguf":
            hf, tokenizer, _ = load_transformers(path.parent, gguf_file=path.name, log=log, name=name)
        else:
            raise UnsupportedGraphError(f"{path}: a decoder is built from a Hugging Face folder, a GGUF file, a "
                                        "sample or a transformers model, not from this file")
        source_path, name = path, name or path.stem
    else:
        hf, name = source, name or type(source).__name__
    model = llama_decoder(hf, tokenizer, options, name=name, log=log)
    if window is not None:
        length = min(window, DecoderSpec.of(model).capacity)
        model.sample_inputs = decoder_feeds(model, lm_windows(tokenizer, "eval", 2, length))
    model.source = source_path
    return lower(model, log=log) if form == "onnx" else model


def _guess_task(output_names: list[str]) -> str:
    if output_names and output_names[0] == "logits":
        return "causal-lm"
    if output_names and output_names[0] in ("embedding", "sentence_embedding"):
        return "embedding"
    return "generic"
