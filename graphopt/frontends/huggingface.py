"""Hugging Face folders (safetensors) and GGUF files, traced to the FX form through transformers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from graphopt.errors import ModelLoadError
from graphopt.frontends.torch_module import from_module
from graphopt.ir import Model

__all__ = ["from_hf", "CausalLMLogits", "SentenceEmbedding"]


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
