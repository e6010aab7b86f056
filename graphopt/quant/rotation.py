"""Orthogonal rotations that spread activation outliers over all channels (QuaRot, SpinQuant).

A Hadamard matrix is the rotation of choice: every entry has the same magnitude, so a channel
with a large value lands evenly on all channels, and it is exact in float. Sizes come from
Sylvester doubling times one Paley (type I) block: n = 2^k · (q + 1) with q a prime ≡ 3 (mod 4),
which covers hidden sizes such as 576 = 8 · 72, 768 = 64 · 12, 1536 = 128 · 12 and every power of two.
Other sizes fall back to a seeded random orthogonal matrix.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hadamard", "rotation"]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _paley(q: int) -> np.ndarray:
    """Paley type I Hadamard matrix of order q + 1, q prime ≡ 3 (mod 4)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if r in squares else -1 for r in range(1, q)])
    jacobsthal = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    skew = np.zeros((q + 1, q + 1), dtype=np.int64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return skew + np.eye(q + 1, dtype=np.int64)


def hadamard(n: int) -> np.ndarray | None:
    """A ±1 matrix H with H·Hᵀ = n·I, or None when n is not 2^k·(q+1) as above."""
    for k in range(int(np.log2(n)) + 1 if n > 0 else 0, -1, -1):
        if n % (1 << k):
            continue
        block = n >> k
        if block == 1:
            core = np.ones((1, 1), dtype=np.int64)
        elif block % 4 == 0 and _is_prime(block - 1):
            core = _paley(block - 1)
        else:
            continue
        sylvester = np.ones((1, 1), dtype=np.int64)
        for _ in range(k):
            sylvester = np.block([[sylvester, sylvester], [sylvester, -sylvester]])
        return np.kron(sylvester, core)
    return None


def rotation(n: int, seed: int = 0) -> np.ndarray:
    """An n×n orthogonal float64 matrix: a Hadamard matrix with random row signs / √n when one
    exists (random signs break the alignment of H's first row with constant channels), else the
    Q factor of a Gaussian matrix. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    h = hadamard(n)
    if h is not None:
        return rng.choice([-1.0, 1.0], size=n)[:, None] * h / np.sqrt(n)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]
