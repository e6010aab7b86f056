"""Shared fixtures: real models are loaded once per test session (SmolLM2 takes seconds only
after its ONNX form is cached; see graphopt.frontends.samples)."""

import numpy as np
import pytest

import graphopt
from graphopt.frontends.corpora import lm_windows


@pytest.fixture(scope="session")
def tiny_fx():
    """The tiny Llama (trained on bytes, see graphopt.frontends.samples) in FX form (treat as
    read-only; copy() before mutating)."""
    return graphopt.load("sample:tiny-llama")


def read_only(model):
    """Marks every weight array of an ONNX-form model read-only and returns the model.

    Model.copy() shares weight arrays (copy-on-write by contract: a pass assigns a new array,
    never writes into one), so a write into a session model's array would change it for every
    later test; with the arrays read-only such a write raises where it happens.
    """
    for tensor in model.graph.tensors().values():
        if isinstance(getattr(tensor, "values", None), np.ndarray):
            tensor.values.flags.writeable = False
    return model


@pytest.fixture(scope="session")
def tiny_onnx(tiny_fx):
    """The tiny Llama lowered to ONNX (weights read-only; copy() before changing the graph)."""
    return read_only(graphopt.lower(tiny_fx))


@pytest.fixture(scope="session")
def smollm2_onnx():
    """SmolLM2-135M in ONNX form (weights read-only; copy() before changing the graph)."""
    return read_only(graphopt.load("sample:smollm2", form="onnx"))


@pytest.fixture(scope="session")
def minilm_onnx():
    """all-MiniLM-L6-v2 in ONNX form (weights read-only; copy() before changing the graph)."""
    return read_only(graphopt.load("sample:minilm", form="onnx"))


@pytest.fixture(scope="session")
def smollm2_calib(smollm2_onnx):
    """Four calibration windows of 64 tokens (small, for tests)."""
    return [{"input_ids": w} for w in lm_windows(smollm2_onnx.tokenizer, "calib", 4, 64)]


@pytest.fixture(scope="session")
def smollm2_eval(smollm2_onnx):
    """Four evaluation windows of 64 tokens, disjoint from calibration."""
    return lm_windows(smollm2_onnx.tokenizer, "eval", 4, 64)
