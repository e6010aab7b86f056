"""Fixtures shared by the pass tests: deliberately broken numerics that a fidelity check must catch."""

import numpy as np
import pytest


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
