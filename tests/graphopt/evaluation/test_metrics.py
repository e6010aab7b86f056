"""Fidelity metrics against values computed by hand."""

import math

import numpy as np
import pytest

from graphopt.evaluation import metrics


def test_sqnr_db_by_hand():
    # signal 3²+4² = 25, noise 0²+1² = 1 -> 10·log10(25)
    assert metrics.sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 3.0])) == pytest.approx(10 * math.log10(25), abs=1e-12)
    assert metrics.sqnr_db(np.ones(4), np.ones(4)) == float("inf")
    assert metrics.sqnr_db(np.zeros(2), np.ones(2)) == float("-inf")


def test_cosine_by_hand():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    test = np.array([[1.0, 1.0], [0.0, -3.0]])
    # rows: 1/√2 and -1 -> mean (0.70710678 - 1) / 2
    assert metrics.cosine(ref, test) == pytest.approx((1 / math.sqrt(2) - 1) / 2, abs=1e-12)
    # flattened: (1 + 0 + 0 - 6) / (√5 · √11)
    assert metrics.cosine(ref, test, axis=None) == pytest.approx(-5 / math.sqrt(55), abs=1e-12)
    assert metrics.cosine(np.zeros((1, 3)), np.zeros((1, 3))) == 1.0


def test_overlap_at_k_by_hand():
    ref = np.array([[[5.0, 4.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0]]])
    test = np.array([[[5.0, 0.0, 3.0, 4.0], [3.0, 1.0, 2.0, 0.0]]])
    # top-1: position 0 agrees (0 = 0), position 1 does not (3 vs 0) -> 0.5
    assert metrics.overlap_at_k(ref, test, 1) == 0.5
    # top-2: {0,1} vs {0,3} -> 1/2; {3,2} vs {0,2} -> 1/2 -> 0.5
    assert metrics.overlap_at_k(ref, test, 2) == 0.5
    # top-3: {0,1,2} vs {0,3,2} -> 2/3; {3,2,1} vs {0,2,1} -> 2/3
    assert metrics.overlap_at_k(ref, test, 3) == pytest.approx(2 / 3)
    assert metrics.overlap_at_k(ref, ref, 3) == 1.0


def test_nll_and_perplexity_by_hand():
    vocab = 7
    ids = np.array([[1, 2, 3, 4]])
    # uniform logits: every next token has probability 1/V -> perplexity V
    assert metrics.perplexity(lambda x: np.zeros(x.shape + (vocab,)), [ids]) == pytest.approx(vocab, rel=1e-12)
    # two-token vocabulary, logits (0, ln 3): p(1) = 3/4, p(0) = 1/4
    logits = np.tile(np.array([0.0, math.log(3.0)]), (1, 3, 1))
    loss, count = metrics.nll_sum(logits, np.array([[0, 1, 0]]))
    assert count == 2
    assert loss == pytest.approx(-math.log(0.75) - math.log(0.25), abs=1e-12)
    ppl = metrics.perplexity(lambda x: logits, [np.array([0, 1, 0])])
    assert ppl == pytest.approx(math.exp(loss / 2), rel=1e-12)


def test_compare_outputs():
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((1, 9, 11))]
    fid = metrics.compare_outputs([logits[0]], [logits[0] * 1.1], "causal-lm")
    assert fid["sqnr_db"] == pytest.approx(20.0, abs=1e-5)  # noise is a tenth of the signal (float32 rounding)
    assert fid["cosine"] == pytest.approx(1.0) and fid["overlap@1"] == 1.0
    assert "overlap@1" not in metrics.compare_outputs([logits[0]], [logits[0]], "embedding")
