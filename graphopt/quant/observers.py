"""Observers: streaming range estimators for activations (min-max, percentile, MSE-optimal clipping).

Each observer is an `graphopt.analysis.capture` accumulator (`update(x)` per calibration batch) and
answers `range() -> (lo, hi)` and `params(spec) -> (scale, zero_point)`. Percentile and MSE keep a
histogram whose span grows with the data (old counts are re-binned), so memory stays fixed
however many batches stream through. Per-tensor only for percentile/MSE; min-max also per channel.
"""

from __future__ import annotations

import numpy as np

from graphopt.errors import OptionError
from graphopt.quant import numerics
from graphopt.quant.spec import QuantSpec

__all__ = ["MinMaxObserver", "HistogramObserver", "PercentileObserver", "MSEObserver", "OBSERVERS", "make_observer"]


class MinMaxObserver:
    """Running min and max, per channel of `axis` when given (a 1-D range per channel), and the
    mean square of everything seen (`sqnr_db`). The one min-max accumulator: calibration, the
    sensitivity probe's ranges and SmoothQuant's per-channel maxima all use it."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.lo = self.hi = None
        self.sum_sq, self.count = 0.0, 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if self.axis is None:
            lo, hi = x.min(), x.max()
        else:
            axis = self.axis % x.ndim
            others = tuple(i for i in range(x.ndim) if i != axis)
            lo, hi = x.min(axis=others), x.max(axis=others)
        self.sum_sq += float(np.einsum("i,i->", x.ravel(), x.ravel(), dtype=np.float64))
        self.count += x.size
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.lo is None:
            raise OptionError("observer saw no data: the calibration feeds never reached this tensor")
        return np.asarray(self.lo, dtype=np.float64), np.asarray(self.hi, dtype=np.float64)

    def params(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        return numerics.scale_zero_point(*self.range(), spec)

    def sqnr_db(self, spec: QuantSpec) -> float:
        """Estimated SQNR of quantizing what was seen with `spec` (rounding noise scale²/12 per
        value against the mean square): a cheap per-point sensitivity proxy."""
        scale, _ = self.params(spec)
        noise = float(np.mean(np.asarray(scale, np.float64) ** 2)) / 12.0
        signal = self.sum_sq / max(self.count, 1)
        return float(10.0 * np.log10(max(signal, 1e-30) / noise))


class HistogramObserver(MinMaxObserver):
    """A fixed-size histogram over a span that grows to cover everything seen (per tensor)."""

    def __init__(self, bins: int = 2048):
        super().__init__(None)
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.edges: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        super().update(x)
        lo, hi = float(min(self.lo, 0.0)), float(max(self.hi, 0.0))
        if hi == lo:
            hi = lo + 1e-8
        if self.edges is None or lo < self.edges[0] or hi > self.edges[-1]:
            self._rebin(lo, hi)
        counts, _ = np.histogram(x, bins=self.edges)
        self.counts += counts

    def _rebin(self, lo: float, hi: float) -> None:
        if self.edges is not None:  # widen by half again so repeated growth stays rare
            width = hi - lo
            lo, hi = min(lo, self.edges[0] - 0.25 * width), max(hi, self.edges[-1] + 0.25 * width)
        edges = np.linspace(lo, hi, self.bins + 1)
        if self.edges is not None and self.counts.any():
            centers = 0.5 * (self.edges[:-1] + self.edges[1:])
            self.counts, _ = np.histogram(centers, bins=edges, weights=self.counts)
        self.edges = edges

    @property
    def centers(self) -> np.ndarray:
        return 0.5 * (self.edges[:-1] + self.edges[1:])


class PercentileObserver(HistogramObserver):
    """Range from the `percentile`-th percentile of |x| (symmetric) or of each tail (asymmetric)."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        if not 50.0 < percentile <= 100.0:
            raise OptionError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins)
        self.percentile = percentile

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = super().range()
        cdf = np.cumsum(self.counts) / max(self.counts.sum(), 1.0)
        tail = 1.0 - self.percentile / 100.0
        p_lo = self.edges[min(np.searchsorted(cdf, tail), self.bins - 1)]
        p_hi = self.edges[min(np.searchsorted(cdf, 1.0 - tail) + 1, self.bins)]
        return np.asarray(max(p_lo, lo)), np.asarray(min(p_hi, hi))


class MSEObserver(HistogramObserver):
    """Range whose quantization error (rounding + clipping, summed over the histogram) is least.

    Candidate ranges shrink the observed [min, max] by factors in (0, 1]; the expected error of
    each (clipping of the histogram's bins beyond the grid + scale²/12 rounding inside it) is
    computed for the spec it will serve, so the search costs `steps` × `bins` operations, not a
    pass over the data.
    """

    def __init__(self, steps: int = 100, bins: int = 2048):
        super().__init__(bins)
        self.steps = steps
        self._spec: QuantSpec | None = None

    def params(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = MinMaxObserver.range(self)
        centers, counts = self.centers, self.counts
        best, best_err = (lo, hi), np.inf
        flat = QuantSpec(spec.dtype, "tensor", symmetric=spec.symmetric)
        for factor in np.linspace(1.0, 0.05, self.steps):
            scale, zero_point = numerics.scale_zero_point(lo * factor, hi * factor, spec)
            # values inside the grid's span round with uniform error (scale²/12; bins are too coarse
            # to resolve rounding); values beyond it are clipped to the grid's edge
            edge_lo = float(numerics.dequantize(np.array(flat.qmin), scale, zero_point, flat))
            edge_hi = float(numerics.dequantize(np.array(flat.qmax), scale, zero_point, flat))
            clipped = np.clip(centers, edge_lo, edge_hi)
            err = float(np.sum(counts * ((centers - clipped) ** 2 + float(scale) ** 2 / 12.0)))
            if err < best_err:
                best, best_err = (lo * factor, hi * factor), err
        self.best = best
        return numerics.scale_zero_point(*best, spec)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if getattr(self, "best", None) is None:
            raise OptionError("MSEObserver.range() is known only after params(spec) chose it")
        return np.asarray(self.best[0]), np.asarray(self.best[1])


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(kind: str, **kwargs):
    """An observer by its option name: "minmax", "percentile" or "mse"."""
    if kind not in OBSERVERS:
        raise OptionError(f"observer must be one of {', '.join(OBSERVERS)}, got {kind!r}")
    return OBSERVERS[kind](**kwargs)
