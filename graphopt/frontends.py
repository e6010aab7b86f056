"""Frontends: turn an ONNX file, a Hugging Face folder, a GGUF file or an nn.Module into a Model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphopt import onnx_io
from graphopt.errors import ModelLoadError
from graphopt.ir import Model, TensorSpec

__all__ = ["load", "from_module", "from_hf", "CausalLMLogits", "SentenceEmbedding"]


def load(source: Any, example_inputs: dict[str, np.ndarray] | None = None, *,
         dynamic_axes: dict[str, dict[int, str]] | None = None, task: str | None = None,
         name: str | None = None, form: str = "fx", log=print) -> Model:
    """Load a model from any supported source.

    - `"sample:NAME"`: a bundled sample (see `graphopt.samples`); `form="onnx"` loads it lowered
    - a path to an `.onnx` file (external data allowed only inside the model's folder)
    - a path to a Hugging Face folder (config.json + safetensors weights)
    - a path to a `.gguf` file (dequantised to float through transformers)
    - an `nn.Module` with `example_inputs` (name -> array), traced with torch.export
    """
    if isinstance(source, str) and source.startswith("sample:"):
        from graphopt import samples

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
        proto = onnx_io.load_onnx(path)
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


class CausalLMLogits:
    """Factory for a module `input_ids -> logits` that keeps Hugging Face parameter names."""

    def __new__(cls, hf_model):
        import torch

        class _Logits(torch.nn.Module):
            def __init__(self, lm):
                super().__init__()
                self.model = lm.model  # parameter names stay "model.layers.N..." and "lm_head.weight"
                self.lm_head = lm.lm_head

            def forward(self, input_ids):
                hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
                return self.lm_head(hidden)

        return _Logits(hf_model).eval()


class SentenceEmbedding:
    """Factory for `(input_ids, attention_mask) -> L2-normalised mean-pooled embedding`."""

    def __new__(cls, hf_encoder):
        import torch

        class _Embed(torch.nn.Module):
            def __init__(self, encoder):
                super().__init__()
                self.encoder = encoder

            def forward(self, input_ids, attention_mask):
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, dim=-1)

        return _Embed(hf_encoder).eval()


def from_module(module, example_inputs: dict[str, np.ndarray], *, dynamic_axes=None,
                output_names: list[str] | None = None, task: str = "generic", name: str = "model",
                sample_inputs: list[dict[str, np.ndarray]] | None = None, tokenizer=None) -> Model:
    """Trace `module` with torch.export (non-strict) into the FX form.

    `dynamic_axes` maps input name -> {axis: dim name}; axes sharing a name share a symbol.
    """
    import torch

    dynamic_axes = dynamic_axes or {}
    shapes = {}
    for input_name in example_inputs:
        axes = {}
        for axis, dim_name in dynamic_axes.get(input_name, {}).items():
            # DYNAMIC lets export derive the range (e.g. BERT's 512 positions) instead of failing on ours
            axes[axis] = torch.export.Dim.DYNAMIC
        shapes[input_name] = axes
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in example_inputs.values())
    module.eval()
    try:
        program = torch.export.export(module, args, dynamic_shapes=tuple(shapes.values()), strict=False)
    except Exception as exc:  # torch.export raises many types; the user needs the model's name
        raise ModelLoadError(f"torch.export could not trace '{name}': {type(exc).__name__}: {exc}") from exc
    gm = program.module()
    with torch.no_grad():
        outs = gm(*args)
    outs = outs if isinstance(outs, (tuple, list)) else [outs]
    output_names = output_names or [f"output_{i}" for i in range(len(outs))]
    inputs = [
        TensorSpec(n, str(v.dtype), tuple(dynamic_axes.get(n, {}).get(a, s) for a, s in enumerate(v.shape)))
        for n, v in example_inputs.items()
    ]
    outputs = [TensorSpec(n, str(o.dtype).replace("torch.", ""), tuple(o.shape)) for n, o in zip(output_names, outs)]
    return Model(fx=gm, inputs=inputs, outputs=outputs, task=task, name=name,
                 sample_inputs=sample_inputs if sample_inputs is not None else [dict(example_inputs)],
                 tokenizer=tokenizer)


def from_hf(folder: Path, *, gguf_file: str | None = None, log=print, name: str | None = None,
            sample_inputs: list[dict[str, np.ndarray]] | None = None) -> Model:
    """A Hugging Face folder (safetensors only) or a GGUF file, traced to the FX form.

    Causal LMs become `input_ids -> logits`; encoders become sentence-embedding models.
    """
    import torch
    import transformers

    folder = Path(folder)
    if gguf_file is None:
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder}: not a Hugging Face model folder (no config.json)")
        if not list(folder.glob("*.safetensors")):
            raise ModelLoadError(
                f"{folder}: no .safetensors weights; graphopt does not unpickle PyTorch .bin files"
            )
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{folder / 'config.json'}: not valid JSON: {exc}") from exc
        causal = any(a.endswith("ForCausalLM") for a in config.get("architectures", []))
    else:
        causal = True
    start = time.perf_counter()
    kwargs = {"dtype": torch.float32}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = True
    try:
        if causal:
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
        else:
            hf = transformers.AutoModel.from_pretrained(folder, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{folder / (gguf_file or '')}: transformers could not load it: {exc}") from exc
    log(f"load: {name or folder.name} weights in {time.perf_counter() - start:.1f} s")
    hf.eval()
    start = time.perf_counter()
    if causal:
        if sample_inputs is None:
            ids = tokenizer("graphopt compiles models for phones and NPUs.", return_tensors="np")["input_ids"]
            sample_inputs = [{"input_ids": np.tile(ids.astype(np.int64), (2, 1))}]
        model = from_module(CausalLMLogits(hf), sample_inputs[0], dynamic_axes={"input_ids": {0: "batch", 1: "seq"}},
                            output_names=["logits"], task="causal-lm", name=name or folder.name,
                            sample_inputs=sample_inputs, tokenizer=tokenizer)
    else:
        if sample_inputs is None:
            enc = tokenizer(["graphopt compiles models.", "Phones need small models."], padding=True, return_tensors="np")
            sample_inputs = [{"input_ids": enc["input_ids"].astype(np.int64),
                              "attention_mask": enc["attention_mask"].astype(np.int64)}]
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
        model = from_module(SentenceEmbedding(hf), sample_inputs[0], dynamic_axes=axes, output_names=["embedding"],
                            task="embedding", name=name or folder.name, sample_inputs=sample_inputs,
                            tokenizer=tokenizer)
    model.source = folder / gguf_file if gguf_file else folder
    log(f"load: traced with torch.export in {time.perf_counter() - start:.1f} s")
    return model
