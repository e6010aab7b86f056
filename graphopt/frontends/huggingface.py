"""Hugging Face folders (safetensors) and GGUF files, checked, then traced to the FX form through transformers.

Before transformers reads anything, `check_hf_folder` / `check_gguf` read what it would trust:
config.json (or the GGUF metadata) with its sizes bounded and checked against the weights
present, the shard index (every shard a .safetensors file inside the folder: torch.load never
runs), every safetensors header and the JSON files the tokenizer reads.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import GraphoptError, ModelLoadError, UnsafePathError
from graphopt.files.gguf_files import GGUFHeader, read_gguf_header
from graphopt.files.reading import confined_path, read_json, shown, want_dict, want_int, want_str
from graphopt.files.safetensors_files import read_safetensors_header
from graphopt.frontends.torch_module import from_module
from graphopt.ir import Model

__all__ = ["from_hf", "load_transformers", "check_hf_folder", "check_tokenizer_files", "check_gguf", "ModelDims",
           "CausalLMLogits", "SentenceEmbedding"]

MAX_CONFIG_BYTES = 4 << 20
MAX_INDEX_BYTES = 64 << 20
MAX_TOKENIZER_BYTES = 256 << 20  # the largest tokenizer.json in use is tens of MB
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "added_tokens.json")
# caps no on-device model comes near; a config past them is a typo or an attack, refused before building
LIMITS = {"layers": 512, "hidden": 1 << 16, "heads": 1024, "kv_heads": 1024, "intermediate": 1 << 18,
          "vocab": 1 << 22, "head_dim": 4096}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|blk)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|word_embeddings|wte|token_embd)\.weight$")


@dataclass(frozen=True)
class ModelDims:
    """The sizes a config claims (None: not given), named the same for config.json and GGUF."""

    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    vocab: int | None = None
    head_dim: int | None = None

    @classmethod
    def read(cls, values: dict[str, Any], keys: dict[str, tuple[str, ...]], where: str) -> "ModelDims":
        """Dims from `values` (config.json or GGUF metadata): for each field the first of its `keys`
        present, an integer in [1, LIMITS[field]] (bools and 8.7 refused)."""
        found = {}
        for name, candidates in keys.items():
            key = next((k for k in candidates if values.get(k) is not None), None)
            if key is not None:
                found[name] = want_int(values[key], f"{where}: '{key}'", ModelLoadError, lo=1, hi=LIMITS[name])
        return cls(**found)

    def check(self, tensors: dict[str, tuple[int, ...]], where: str, *, hidden_axis: int) -> None:
        """Refuse dims that contradict each other or the weights (layer count, embedding width)."""
        if self.heads and self.hidden and not self.head_dim and self.hidden % self.heads:
            raise ModelLoadError(f"{where}: hidden size {self.hidden} is not a multiple of {self.heads} heads")
        if self.heads and self.kv_heads and self.heads % self.kv_heads:
            raise ModelLoadError(f"{where}: {self.heads} attention heads are not a multiple of {self.kv_heads} "
                                 "key/value heads")
        layers = {int(m.group(1)) for name in tensors if (m := _LAYER_INDEX.search(name))}
        if self.layers is not None and layers and self.layers != max(layers) + 1:
            raise ModelLoadError(f"{where}: claims {self.layers} layers, the weights hold {max(layers) + 1} "
                                 f"(layer indices 0..{max(layers)})")
        embedding = next((shape for name, shape in tensors.items() if _EMBEDDING.search(name)), None)
        if self.hidden and embedding and len(embedding) == 2 and embedding[hidden_axis] != self.hidden:
            raise ModelLoadError(f"{where}: hidden size {self.hidden}, but the token embedding is "
                                 f"{list(embedding)}")


HF_KEYS = {"layers": ("num_hidden_layers", "n_layer", "num_layers"), "hidden": ("hidden_size", "n_embd", "d_model"),
           "heads": ("num_attention_heads", "n_head"), "kv_heads": ("num_key_value_heads",),
           "intermediate": ("intermediate_size", "n_inner", "ffn_dim"), "vocab": ("vocab_size",),
           "head_dim": ("head_dim",)}


def _gguf_keys(arch: str) -> dict[str, tuple[str, ...]]:
    return {"layers": (f"{arch}.block_count",), "hidden": (f"{arch}.embedding_length",),
            "heads": (f"{arch}.attention.head_count",), "kv_heads": (f"{arch}.attention.head_count_kv",),
            "intermediate": (f"{arch}.feed_forward_length",), "vocab": (f"{arch}.vocab_size",),
            "head_dim": (f"{arch}.attention.key_length",)}


def _safetensors_shards(folder: Path) -> list[Path]:
    """The weight files transformers would read, every one a .safetensors file inside `folder`."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = want_dict(read_json(index, max_bytes=MAX_INDEX_BYTES, error=ModelLoadError, what="shard index"),
                         str(index), ModelLoadError)
        weight_map = want_dict(data.get("weight_map"), f"{index}: 'weight_map'", ModelLoadError)
        shards: dict[str, str] = {}
        for weight, shard in weight_map.items():
            shard = want_str(shard, f"{index}: weight {shown(weight)}", ModelLoadError, max_len=4096)
            if not shard.endswith(".safetensors"):
                raise UnsafePathError(f"{index}: weight {shown(weight)} lives in {shown(shard)}, not a .safetensors "
                                      "file; graphopt never unpickles PyTorch weights")
            shards.setdefault(shard, weight)
        return [_weight_file(folder, shard, f"{index}: weight {shown(weight)}") for shard, weight in shards.items()]
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors").is_symlink():
        return [_weight_file(folder, "model.safetensors", str(folder))]
    raise ModelLoadError(f"{folder}: no model.safetensors (nor model.safetensors.index.json); graphopt reads "
                         "safetensors weights only and does not unpickle PyTorch .bin files")


def _weight_file(folder: Path, name: str, who: str) -> Path:
    """`name` inside `folder`; a symlink may point out only into the Hugging Face cache's own blob
    store (snapshots/<rev>/x -> ../../blobs/<hash>), as `huggingface_hub` lays models out."""
    if not name.startswith(("/", "\\")) and ".." not in Path(name).parts:
        target = (folder / name).resolve()
        if (folder.resolve().parent.name == "snapshots" and target.parent == folder.resolve().parents[1] / "blobs"
                and target.is_file()):
            return target
    return confined_path(folder, name, who=who, missing=ModelLoadError, label="the model's folder")


def check_hf_folder(folder: Path) -> dict:
    """config.json (bounded, a mapping, sizes sane and matching the weights), every shard's header,
    and the tokenizer's JSON files; returns the config. Any problem: a GraphoptError naming the file."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder}: not a Hugging Face model folder (no config.json)")
    config = want_dict(read_json(config_path, max_bytes=MAX_CONFIG_BYTES, error=ModelLoadError, what="config.json"),
                       str(config_path), ModelLoadError)
    tensors: dict[str, tuple[int, ...]] = {}
    for shard in _safetensors_shards(folder):
        entries, _, _ = read_safetensors_header(shard)
        tensors.update({name: entry.shape for name, entry in entries.items()})
    ModelDims.read(config, HF_KEYS, str(config_path)).check(tensors, str(config_path), hidden_axis=1)
    check_tokenizer_files(folder)
    return config


def check_tokenizer_files(folder: Path) -> None:
    """The tokenizer's JSON files in `folder`: each inside it, bounded and valid JSON."""
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            read_json(confined_path(folder, name, who=str(folder), missing=ModelLoadError),
                      max_bytes=MAX_TOKENIZER_BYTES, error=ModelLoadError, what=name)


def check_gguf(path: Path) -> GGUFHeader:
    """The GGUF header, bounded (see read_gguf_header), its model sizes sane and matching its tensors."""
    header = read_gguf_header(path)
    arch = want_str(header.metadata.get("general.architecture"), f"{path}: metadata 'general.architecture'",
                    ModelLoadError, max_len=64)
    tensors = {name: t.shape for name, t in header.tensors.items()}
    ModelDims.read(header.metadata, _gguf_keys(arch), f"{path}: metadata").check(tensors, f"{path}: metadata",
                                                                               hidden_axis=0)
    return header


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


def load_transformers(folder: Path, *, gguf_file: str | None = None, log=print, name: str | None = None):
    """(transformers model in eval mode, its tokenizer, whether it is a causal LM) from a Hugging
    Face folder (safetensors only) or a GGUF file, checked before transformers reads anything."""
    if gguf_file is None:
        config = check_hf_folder(folder)
        architectures = config.get("architectures") or []
        causal = isinstance(architectures, list) and any(
            isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures)
    else:
        check_gguf(folder / gguf_file)
        causal = True
    import torch
    import transformers

    start = time.perf_counter()
    kwargs = {"dtype": torch.float32, "trust_remote_code": False}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = True
    tokenizer_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        if causal:
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        else:
            hf = transformers.AutoModel.from_pretrained(folder, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **tokenizer_kwargs)
    except GraphoptError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers, tokenizers and gguf raise many types; name the file
        raise ModelLoadError(f"{folder / (gguf_file or '')}: transformers could not load it: "
                             f"{type(exc).__name__}: {shown(str(exc), 300)}") from exc
    log(f"load: {name or folder.name} weights in {time.perf_counter() - start:.1f} s")
    return hf.eval(), tokenizer, causal


def from_hf(folder: Path, *, gguf_file: str | None = None, log=print, name: str | None = None,
            sample_inputs: list[dict[str, np.ndarray]] | None = None) -> Model:
    """A Hugging Face folder (safetensors only) or a GGUF file, traced to the FX form.

    Causal LMs become `input_ids -> logits`; encoders become sentence-embedding models.
    """
    folder = Path(folder)
    hf, tokenizer, causal = load_transformers(folder, gguf_file=gguf_file, log=log, name=name)
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
