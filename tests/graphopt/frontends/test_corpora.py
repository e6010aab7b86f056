"""The corpus registry: pydoc topics and the Lee news corpus, their splits, windows and refusals."""

import importlib.metadata

import numpy as np
import pytest

from graphopt.frontends import corpora
from graphopt.frontends.corpora import CorpusError, corpus_named, documents, lm_windows, text_split


def test_splits_partition_each_corpus_by_position():
    for name in ("pydoc-topics", "lee-news"):
        every = corpora.CORPORA[name].read()
        calib, held = documents(name, "calib"), documents(name, "eval")
        assert list(calib) == every[0::2] and list(held) == every[1::2]
    news = corpora.CORPORA["lee-news"].read()
    assert len(news) == len(set(news)) == 293  # 300 lines, 7 repeats kept once: no item is in both splits


def test_pydoc_text_is_what_the_tiny_model_trained_on():
    # the tiny Llama's cache key holds this text: the registry must not change it
    from pydoc_data.topics import topics

    names = sorted(topics)
    assert text_split("calib") == "\n\n".join(topics[n] for n in names[0::2])
    assert text_split("eval", "sample:pydoc-topics") == "\n\n".join(topics[n] for n in names[1::2])


def test_news_is_prose_of_another_kind():
    news, docs = text_split("eval", "lee-news"), text_split("eval", "pydoc-topics")
    assert news.startswith("Indian security forces have shot dead eight suspected militants")
    # documentation is full of code punctuation; news items are sentences
    code = lambda t: sum(t.count(c) for c in "()[]{}=_*`>") / len(t)  # noqa: E731
    assert code(docs) > 0.02 and code(news) < 0.002


def test_byte_windows_of_both_corpora():
    news = lm_windows(None, "eval", 3, 64, corpus="lee-news")
    assert [w.shape for w in news] == [(1, 64)] * 3 and news[0].dtype == np.int64
    assert bytes(news[0][0].astype(np.uint8)) == text_split("eval", "lee-news").encode()[:64]
    assert not np.array_equal(news[0], lm_windows(None, "eval", 1, 64)[0])
    with pytest.raises(ValueError, match="the text holds 1364"):
        lm_windows(None, "eval", 5000, 128, corpus="lee-news")


def test_unknown_corpus_and_split_are_refused_by_name():
    with pytest.raises(CorpusError, match=r"unknown corpus 'sample:wiki' \(known: sample:pydoc-topics, sample:lee-news"):
        corpus_named("sample:wiki")
    with pytest.raises(CorpusError, match="split must be 'calib' or 'eval', got 'test'"):
        documents("lee-news", "test")


class _Dist:
    def __init__(self, path):
        self.path = path

    def locate_file(self, name):
        return self.path


def test_a_changed_or_missing_news_file_is_refused(tmp_path, monkeypatch):
    real = importlib.metadata.distribution("gensim").locate_file(corpora._LEE_FILE)
    changed = tmp_path / "lee_background.cor"
    changed.write_bytes(real.read_bytes().replace(b"Hill Top", b"Hill Tip"))  # same size, other text
    assert changed.stat().st_size == corpora._LEE_BYTES
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: _Dist(changed))
    with pytest.raises(CorpusError, match="is not the file gensim 4.4.0 ships"):
        corpora.CORPORA["lee-news"].read()
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: _Dist(tmp_path / "absent.cor"))
    with pytest.raises(CorpusError, match="cannot read .*absent.cor"):
        corpora.CORPORA["lee-news"].read()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(CorpusError, match=r"gensim is not installed: pip install --no-deps gensim==4.4.0"):
        corpora.CORPORA["lee-news"].read()
