"""Sparsity patterns: N:M and unstructured masks from scores, and the checks that a weight keeps one.

Every function works on a weight in the canonical [out, in] layout (torch Linear); callers move
ONNX MatMul weights ([in, out]) with `to_canonical` / `from_canonical`. N:M groups are M
consecutive weights along the INPUT dimension (what sparse tensor cores and NPUs skip).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from graphopt.errors import OptionError, UnsupportedGraphError

__all__ = [
    "Pattern", "parse_pattern", "to_canonical", "from_canonical", "nm_mask", "unstructured_mask",
    "check_pattern", "is_n_m", "sparsity_of",
]


@dataclass(frozen=True)
class Pattern:
    """Either N:M (`n` kept of every `m` along the input dim) or unstructured with `ratio` zeros."""

    n: int = 0
    m: int = 0
    ratio: float = 0.0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    @property
    def target(self) -> float:
        """The fraction of zeros this pattern asks for."""
        return 1.0 - self.n / self.m if self.structured else self.ratio


def parse_pattern(text: str | float, ratio: float = 0.5, *, option: str = "pattern") -> Pattern:
    """'2:4' -> Pattern(2, 4); 'unstructured' -> Pattern(ratio=ratio); a number -> unstructured at it.

    Raises OptionError naming `option` for N >= M, N < 0, M < 1 or a ratio outside [0, 1).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        ratio, text = float(text), "unstructured"
    if text == "unstructured":
        if not 0.0 <= ratio < 1.0:
            raise OptionError(f"'nm_sparsity': option '{option}' ratio must be in [0, 1), got {ratio}")
        return Pattern(ratio=float(ratio))
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not found:
        raise OptionError(f"'nm_sparsity': option '{option}' must be 'N:M' or 'unstructured', got {text!r}")
    n, m = int(found.group(1)), int(found.group(2))
    if m < 1 or not 0 <= n < m:
        raise OptionError(f"'nm_sparsity': option '{option}' needs 0 <= N < M, got {n}:{m}")
    return Pattern(n=n, m=m)


def to_canonical(values: np.ndarray, in_axis: int) -> np.ndarray:
    """The [out, in] view of a 2-D weight whose input dim is `in_axis`."""
    return values.T if in_axis == 0 else values


def from_canonical(values: np.ndarray, in_axis: int) -> np.ndarray:
    return np.ascontiguousarray(values.T if in_axis == 0 else values)


# -------------------------------------------------------------------------------- masks
def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the `n` highest scores of every `m` consecutive inputs (True = kept); [out, in]."""
    rows, cols = scores.shape
    if cols % m:
        raise UnsupportedGraphError(f"N:M {n}:{m}: input dim {cols} is not a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep.reshape(rows, cols)


def unstructured_mask(scores: np.ndarray, ratio: float, scope: str = "row") -> np.ndarray:
    """Drop the `ratio` lowest scores per output row ('row', as Wanda) or over the layer ('layer')."""
    if ratio <= 0:
        return np.ones(scores.shape, dtype=bool)
    if scope == "row":
        k = int(scores.shape[1] * ratio)
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
        keep = np.ones(scores.shape, dtype=bool)
        np.put_along_axis(keep, order, False, axis=1)
        return keep
    k = int(scores.size * ratio)
    order = np.argsort(scores, axis=None, kind="stable")[:k]
    keep = np.ones(scores.size, dtype=bool)
    keep[order] = False
    return keep.reshape(scores.shape)


# ------------------------------------------------------------------------------ checks
def is_n_m(values: np.ndarray, axis: int, n: int, m: int) -> bool:
    """At most n non-zeros in every group of m consecutive elements along `axis`."""
    if values.ndim < 2 or values.shape[axis] % m:
        return False
    groups = np.moveaxis(values, axis, -1).reshape(-1, m)
    return bool(np.all(np.count_nonzero(groups, axis=1) <= n))


def sparsity_of(values: np.ndarray) -> float:
    return float(1.0 - np.count_nonzero(values) / max(values.size, 1))


def check_pattern(values: np.ndarray, pattern: Pattern, axis: int, name: str, keep: np.ndarray | None = None) -> None:
    """Raise UnsupportedGraphError naming weight `name` when it violates `pattern` (or its mask)."""
    if pattern.structured and not is_n_m(values, axis, pattern.n, pattern.m):
        raise UnsupportedGraphError(
            f"'nm_sparsity': weight '{name}' violates {pattern.label} along axis {axis} after pruning")
    if keep is not None and np.any(values[~keep] != 0):
        raise UnsupportedGraphError(f"'nm_sparsity': weight '{name}' has non-zeros where its mask prunes")
