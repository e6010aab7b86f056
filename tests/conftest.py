"""Shared fixtures: real models are loaded once per test session (SmolLM2 takes seconds only
after its ONNX form is cached; see graphopt.frontends.samples)."""

import pytest

import graphopt
from graphopt.frontends.corpora import lm_windows


@pytest.fixture(scope="session")
def tiny_fx():
    """The tiny random Llama in FX form (treat as read-only; copy() before mutating)."""
    return graphopt.load("sample:tiny-llama")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_fx):
    """The tiny random Llama lowered to ONNX (read-only; copy() before mutating)."""
    return graphopt.lower(tiny_fx)


@pytest.fixture(scope="session")
def smollm2_onnx():
    """SmolLM2-135M in ONNX form (read-only; copy() before mutating)."""
    return graphopt.load("sample:smollm2", form="onnx")


@pytest.fixture(scope="session")
def minilm_onnx():
    """all-MiniLM-L6-v2 in ONNX form (read-only; copy() before mutating)."""
    return graphopt.load("sample:minilm", form="onnx")


@pytest.fixture(scope="session")
def smollm2_calib(smollm2_onnx):
    """Four calibration windows of 64 tokens (small, for tests)."""
    return [{"input_ids": w} for w in lm_windows(smollm2_onnx.tokenizer, "calib", 4, 64)]


@pytest.fixture(scope="session")
def smollm2_eval(smollm2_onnx):
    """Four evaluation windows of 64 tokens, disjoint from calibration."""
    return lm_windows(smollm2_onnx.tokenizer, "eval", 4, 64)
