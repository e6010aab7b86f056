"""Hadamard matrices and rotations: exact orthogonality, the sizes SmolLM2 and MiniLM need."""

import numpy as np
import pytest

from graphopt.quant.rotation import hadamard, rotation


@pytest.mark.parametrize("n", [1, 2, 4, 12, 64, 72, 576, 768, 1536])
def test_hadamard_is_plus_minus_one_and_orthogonal(n):
    h = hadamard(n)
    assert h is not None and set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=h.dtype))


def test_sizes_without_a_construction_fall_back_to_random_orthogonal():
    assert hadamard(100) is None and hadamard(6) is None
    r = rotation(100, seed=3)
    np.testing.assert_allclose(r @ r.T, np.eye(100), atol=1e-12)
    np.testing.assert_array_equal(r, rotation(100, seed=3))


def test_rotation_is_orthogonal_with_equal_magnitudes_and_seeded():
    r = rotation(576, seed=1)
    np.testing.assert_allclose(r @ r.T, np.eye(576), atol=1e-12)
    np.testing.assert_allclose(np.abs(r), 1 / np.sqrt(576))
    assert not np.array_equal(r, rotation(576, seed=2))
