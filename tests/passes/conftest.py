"""Fixtures shared by the pass tests: deliberately broken numerics that a fidelity check must catch."""

import numpy as np
import pytest

from graphopt.frontends.corpora import lm_windows
from graphopt.pipeline.passes import PassContext


@pytest.fixture
def scale_times_four(monkeypatch):
    """`scale_times_four(owner, name)`: from now on in this test `owner.name`, which returns
    (scale, zero point), gives scales 4x too large (a broken variant of the numerics)."""

    def patch(owner, name: str) -> None:
        original = getattr(owner, name)

        def wrong(*args, **kwargs):
            scale, zero_point = original(*args, **kwargs)
            return np.asarray(scale) * 4, zero_point

        monkeypatch.setattr(owner, name, wrong)

    return patch


@pytest.fixture(scope="module")
def tiny_calib():
    """Four 64-byte calibration windows for the tiny Llama, in a pass context."""
    return PassContext(calib=[{"input_ids": w} for w in lm_windows(None, "calib", 4, 64)], progress=False)


@pytest.fixture(scope="module")
def tiny_eval(tiny_onnx):
    """Two held-out 64-byte windows and the tiny Llama's float logits on them."""
    windows = lm_windows(None, "eval", 2, 64)
    run = tiny_onnx.runner()
    return windows, [run({"input_ids": w})[0] for w in windows]
