"""Text the samples calibrate and evaluate on, as token windows or sentence batches.

`pydoc_data.topics` (Python's own documentation) ships with every Python: topics at even
positions (sorted by name) are the calibration split, odd positions the evaluation split, so the
two never share a window.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

__all__ = ["text_split", "token_windows", "lm_windows", "minilm_batches"]


@lru_cache(maxsize=None)
def text_split(split: Literal["calib", "eval"]) -> str:
    """Python's own documentation topics, split by position (even: calib, odd: eval)."""
    from pydoc_data.topics import topics

    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    names = sorted(topics)
    chosen = names[0::2] if split == "calib" else names[1::2]
    return "\n\n".join(topics[name] for name in chosen)


def token_windows(token_ids: np.ndarray, count: int, length: int) -> list[np.ndarray]:
    """The first `count` non-overlapping windows of `length` tokens, each shaped [1, length]."""
    available = len(token_ids) // length
    if count > available:
        raise ValueError(f"asked for {count} windows of {length} tokens, the text holds {available}")
    return [np.asarray(token_ids[i * length:(i + 1) * length], dtype=np.int64)[None, :] for i in range(count)]


@lru_cache(maxsize=4)
def _encoded(split: str, tokenizer_key: str, tokenizer) -> np.ndarray:
    text = text_split(split)
    if tokenizer is None:  # byte-level: the tiny model's vocabulary is the 256 byte values
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def lm_windows(tokenizer, split: Literal["calib", "eval"], count: int, length: int = 128) -> list[np.ndarray]:
    """Token windows for a causal LM; `tokenizer=None` means the tiny model's byte vocabulary."""
    key = "bytes" if tokenizer is None else getattr(tokenizer, "name_or_path", str(id(tokenizer)))
    return token_windows(_encoded(split, key, tokenizer), count, length)


def minilm_batches(tokenizer, split: Literal["calib", "eval"], count: int, batch: int = 8,
                   max_length: int = 64) -> list[dict[str, np.ndarray]]:
    """Batches of sentences (paragraphs of the split) tokenized for MiniLM, padded per batch."""
    paragraphs = [p.strip() for p in text_split(split).split("\n\n") if len(p.strip()) > 40]
    feeds = []
    for i in range(count):
        chunk = paragraphs[i * batch:(i + 1) * batch]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds.append({"input_ids": enc["input_ids"].astype(np.int64),
                      "attention_mask": enc["attention_mask"].astype(np.int64)})
    return feeds
