"""Fidelity checks shared by the numerical tests: a measured figure less a small margin, asserted by
one check that a pass and its deliberately broken variant both go through (the variant must fail).

A bound is worth having only if a broken pass misses it; each test that uses `Bounds` keeps a
broken variant (wrong scale, transposed weight, shifted mask...) that `misses` must report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from graphopt.evaluation import metrics

__all__ = ["Bounds", "lm_figures"]


@dataclass(frozen=True)
class Bounds:
    """Floors (`at_least`: SQNR, cosine, overlap...) and ceilings (`at_most`: ppl, errors) on figures."""

    at_least: Mapping[str, float] = field(default_factory=dict)
    at_most: Mapping[str, float] = field(default_factory=dict)

    def misses(self, found: Mapping[str, float]) -> list[str]:
        """One line per bound `found` misses ('sqnr_db 12.30 < 35.00'); empty when all hold.
        A figure the bounds name but `found` lacks is a miss too."""
        missed = [f"{k} {found[k]:.4g} < {v:.4g}" for k, v in self.at_least.items() if k in found and not found[k] >= v]
        missed += [f"{k} {found[k]:.4g} > {v:.4g}" for k, v in self.at_most.items() if k in found and not found[k] <= v]
        return missed + [f"{k} not measured" for k in {**self.at_least, **self.at_most} if k not in found]


def lm_figures(reference, model, windows: list[np.ndarray]) -> dict[str, float]:
    """Logit fidelity of `model` against `reference` (graphopt Models, either form) on token
    windows: SQNR (dB), cosine, overlap@1 over every position, and ppl of each on the windows."""
    ref = [reference.run({"input_ids": w})[0] for w in windows]
    out = [model.run({"input_ids": w})[0] for w in windows]
    ref_all, out_all = np.concatenate([r.reshape(-1, r.shape[-1]) for r in ref]), np.concatenate(
        [o.reshape(-1, o.shape[-1]) for o in out])
    nll = [metrics.nll_sum(o, w) for o, w in zip(out, windows)]
    ref_nll = [metrics.nll_sum(r, w) for r, w in zip(ref, windows)]
    count = sum(c for _, c in nll)
    return {"sqnr_db": metrics.sqnr_db(ref_all, out_all), "cosine": metrics.cosine(ref_all, out_all),
            "overlap@1": metrics.overlap_at_k(ref_all, out_all, 1),
            "ppl": float(np.exp(sum(s for s, _ in nll) / count)),
            "reference_ppl": float(np.exp(sum(s for s, _ in ref_nll) / count))}
