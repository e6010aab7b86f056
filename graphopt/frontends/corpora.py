"""Text corpora the samples calibrate and evaluate on, by name, as token windows or sentence batches.

Each corpus is a fixed, ordered list of documents read from something every machine has (no
download at run time); documents at even positions are its calibration split, odd positions its
evaluation split, so the two never share a window.

- `pydoc-topics`: Python's own documentation topics (`pydoc_data.topics`, shipped with every
  Python, PSF license), sorted by name. graphopt's recipes calibrate on its even topics.
- `lee-news`: the Lee background corpus, 300 news items of the Australian Broadcasting
  Corporation's news-mail service collected by Lee, Pincombe and Welsh (2005) for a study of
  document similarity, one item a line, as gensim 4.4.0 ships it in
  `gensim/test/test_data/lee_background.cor`; 7 items appear twice and are kept once (293 items), so
  no evaluation item is also a calibration item. gensim
  is licensed LGPL-2.1-only and states no separate license for the articles; graphopt reads the file
  from the installed package at run time and neither copies nor redistributes it. Natural English of
  another kind than documentation (disasters, politics, sport, courts, quotes), which no recipe
  calibrates on: the second evaluation corpus of the benchmark protocol. Its bytes are checked
  against a SHA-256, so every figure measured on it is measured on the same text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal

import numpy as np

from graphopt.errors import GraphoptError

__all__ = ["CORPORA", "Corpus", "CorpusError", "corpus_named", "documents", "text_split", "token_windows",
           "lm_windows", "minilm_batches", "paragraphs", "sentence_batches"]

Split = Literal["calib", "eval"]


class CorpusError(GraphoptError):
    """A corpus is unknown, its package is missing, or it holds fewer windows than asked for."""


@dataclass(frozen=True)
class Corpus:
    """A named text corpus: where its documents come from and under which license."""

    name: str
    about: str
    license: str
    read: Callable[[], list[str]]  # the documents, in their fixed order


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


_LEE_FILE = "gensim/test/test_data/lee_background.cor"
_LEE_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
_LEE_BYTES = 360_082


def _lee_news() -> list[str]:
    """The distinct lines of gensim's lee_background.cor in file order, found through the package's
    metadata (the gensim package is never imported: it is installed without its dependencies)."""
    import importlib.metadata

    try:
        path = importlib.metadata.distribution("gensim").locate_file(_LEE_FILE)
    except importlib.metadata.PackageNotFoundError:
        raise CorpusError("corpus 'lee-news' reads gensim's test data, and gensim is not installed: "
                          "pip install --no-deps gensim==4.4.0 (make setup does)") from None
    try:
        data = path.read_bytes() if path.stat().st_size == _LEE_BYTES else b""
    except OSError as exc:
        raise CorpusError(f"corpus 'lee-news': cannot read {path}: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != _LEE_SHA256:
        raise CorpusError(f"corpus 'lee-news': {path} is not the file gensim 4.4.0 ships "
                          "(its size or SHA-256 differs): pip install --no-deps gensim==4.4.0")
    lines = (line.strip() for line in data.decode("ascii").splitlines())
    return list(dict.fromkeys(line for line in lines if line))


CORPORA: dict[str, Corpus] = {
    "pydoc-topics": Corpus("pydoc-topics", "Python's documentation topics (pydoc_data.topics), sorted by name",
                           "PSF-2.0 (ships with Python)", _pydoc_topics),
    "lee-news": Corpus("lee-news", "293 ABC news items of the Lee background corpus (gensim 4.4.0 test data)",
                       "distributed in gensim (LGPL-2.1-only); read from the installed package, never copied",
                       _lee_news),
}


def corpus_named(name: str) -> Corpus:
    """The corpus `name` ("pydoc-topics", or as a source "sample:pydoc-topics")."""
    key = name.split(":", 1)[1] if name.startswith("sample:") else name
    if key not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r} (known: {', '.join('sample:' + k for k in CORPORA)})")
    return CORPORA[key]


@lru_cache(maxsize=None)
def documents(corpus: str, split: Split) -> tuple[str, ...]:
    """The documents of a corpus split: even positions are `calib`, odd positions `eval`."""
    if split not in ("calib", "eval"):
        raise CorpusError(f"split must be 'calib' or 'eval', got {split!r}")
    every = corpus_named(corpus).read()
    return tuple(every[0::2] if split == "calib" else every[1::2])


def text_split(split: Split, corpus: str = "pydoc-topics") -> str:
    """The documents of a corpus split joined by blank lines (for pydoc: its topics, even or odd)."""
    return "\n\n".join(documents(corpus, split))


def token_windows(token_ids: np.ndarray, count: int, length: int) -> list[np.ndarray]:
    """The first `count` non-overlapping windows of `length` tokens, each shaped [1, length]."""
    available = len(token_ids) // length
    if count > available:
        raise ValueError(f"asked for {count} windows of {length} tokens, the text holds {available}")
    return [np.asarray(token_ids[i * length:(i + 1) * length], dtype=np.int64)[None, :] for i in range(count)]


@lru_cache(maxsize=8)
def _encoded(corpus: str, split: str, tokenizer_key: str, tokenizer) -> np.ndarray:
    text = text_split(split, corpus)
    if tokenizer is None:  # byte-level: the tiny model's vocabulary is the 256 byte values
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def lm_windows(tokenizer, split: Split, count: int, length: int = 128,
               corpus: str = "pydoc-topics") -> list[np.ndarray]:
    """Token windows of a corpus split for a causal LM; `tokenizer=None` means the tiny model's
    byte vocabulary. More windows than the split holds is a ValueError saying how many it holds."""
    key = "bytes" if tokenizer is None else getattr(tokenizer, "name_or_path", str(id(tokenizer)))
    return token_windows(_encoded(corpus_named(corpus).name, split, key, tokenizer), count, length)


def minilm_batches(tokenizer, split: Split, count: int, batch: int = 8, max_length: int = 64,
                   corpus: str = "pydoc-topics") -> list[dict[str, np.ndarray]]:
    """Batches of sentences (paragraphs of the split longer than 40 characters) tokenized for
    MiniLM, padded per batch."""
    return sentence_batches(tokenizer, paragraphs(text_split(split, corpus)), count, batch, max_length)


def paragraphs(text: str) -> list[str]:
    """The blank-line separated paragraphs of `text` longer than 40 characters, stripped."""
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]


def sentence_batches(tokenizer, sentences: list[str], count: int, batch: int = 8,
                     max_length: int = 64) -> list[dict[str, np.ndarray]]:
    """`count` batches of `batch` sentences in order, tokenized for an encoder (input_ids and
    attention_mask), padded per batch and cut at `max_length` tokens. Fewer sentences than
    count x batch is a ValueError saying how many batches they make."""
    if count * batch > len(sentences):
        raise ValueError(f"asked for {count} batches of {batch} sentences, the text holds {len(sentences) // batch}")
    feeds = []
    for i in range(count):
        chunk = sentences[i * batch:(i + 1) * batch]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds.append({"input_ids": enc["input_ids"].astype(np.int64),
                      "attention_mask": enc["attention_mask"].astype(np.int64)})
    return feeds
