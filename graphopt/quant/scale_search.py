"""Scales chosen by a linear layer's output error on calibration data, not by the weight alone.

For a MatMul y = x·W ([in, out]) with input Hessian H = 2/n·XᵀX (`analysis.capture.InputHessian`),
a weight error ΔW costs ‖X·ΔW‖² = n/2 · Σ_c ΔW_cᵀ H ΔW_c (`output_error`): every choice below is
scored on the layer's own inputs through H, so no activation is kept or run again.

- `awq_scales`: AWQ's per-input-channel scales (Lin et al., arXiv 2306.00978). s_j = rms(X_j)^α
  (normalised to geometric mean 1), the weights' rows multiplied by s before rounding and the
  input divided by s (folded into its producer by `graphopt.quant.smoothing`); α is searched on a
  grid in [0, 1] for the least output error of the rounded weights. The channels that carry the
  most energy get the finest grid.
- `refit_scales`: scale estimation. With the integer codes fixed, the dequantized weight is linear
  in its scales, so the scales of one output channel (one per block of input rows, or one per
  channel) that minimise its output error solve a small least-squares system, G × G for G blocks.
  `estimate_scales` alternates it with rounding to nearest (round, refit, keep the best).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from graphopt.errors import OptionError
from graphopt.quant import numerics
from graphopt.quant.spec import QuantSpec

__all__ = ["output_error", "awq_scales", "refit_scales", "estimate_scales"]


def _torch(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))


def output_error(delta_in_out: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Σ_i ΔW[i, c] (H ΔW)[i, c] per output channel c: ‖X·ΔW_c‖² up to the factor 2/n."""
    d, h = _torch(delta_in_out), _torch(hessian)
    return ((h @ d) * d).sum(0).numpy()


def awq_scales(weights: Sequence[np.ndarray], hessian: np.ndarray, fake_quant: Callable[[np.ndarray], np.ndarray],
               steps: int = 20) -> tuple[np.ndarray, float, float]:
    """(s, α, error ratio): the per-input-channel factors s (float32 [in]) that the [in, out]
    `weights` reading one input share, chosen as rms(X)^α over α in {0, 1/steps, ..., 1} for the least
    Σ output_error(W − fake_quant(s·W)/s) summed over the weights; the ratio is that error over the
    error at α = 0 (s = 1, plain rounding), so ≤ 1. `fake_quant` rounds an [in, out] weight as the
    quantizer will. Inputs that never fire keep s = 1."""
    if steps < 1:
        raise OptionError(f"awq: steps must be >= 1, got {steps}")
    rms = np.sqrt(np.maximum(np.diag(hessian), 0.0) / 2.0)
    alive = rms > 0
    best = (np.ones(rms.shape, np.float32), 0.0, np.inf)
    base = None
    for alpha in np.linspace(0.0, 1.0, steps + 1):
        s = np.ones(rms.shape, np.float64)
        if alive.any():
            s[alive] = rms[alive] ** alpha
            s[alive] /= np.exp(np.mean(np.log(s[alive])))
        s = s.astype(np.float32)
        error = sum(float(output_error(w - fake_quant(w * s[:, None]) / s[:, None], hessian).sum()) for w in weights)
        base = error if base is None else base
        if error < best[2]:
            best = (s, float(alpha), error)
    return best[0], best[1], best[2] / base if base else 1.0


def _group_layout(spec: QuantSpec, rows: int) -> int:
    """Input rows per scale of an [in, out] weight: the block size, or all rows (per channel)."""
    if spec.granularity == "block" and spec.axis % 2 == 0:
        return spec.block_size
    if spec.granularity == "channel" and spec.axis % 2 == 1:
        return rows
    raise OptionError(f"scale estimation needs scales per output channel (axis 1) or per block of input rows "
                      f"(axis 0) of an [in, out] weight; got granularity '{spec.granularity}' axis {spec.axis}")


def refit_scales(weight_in_out: np.ndarray, hessian: np.ndarray, codes: np.ndarray, scale: np.ndarray,
                 zero_point: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Scales (the layout of `scale`: [out] per channel, [ceil(in / block), out] per block) that minimise
    each output channel's output error for fixed `codes`: s_c = (QᵀHQ)⁻¹ QᵀH w_c, Q the channel's
    (codes − zero point) laid out one column per block (a shorter last block when the block size does
    not divide `in`). A channel keeps its old scales where the new ones are not all positive or do
    not lower its error; blocks whose codes are all at the zero point keep theirs (they do not enter
    the error)."""
    import torch

    rows, cols = np.shape(weight_in_out)
    group = _group_layout(spec, rows)
    blocks = -(-rows // group)
    pad = blocks * group - rows  # rows of zeros (weights, codes at the zero point, Hessian): no error, no effect
    w = _torch(np.pad(np.asarray(weight_in_out, np.float64), ((0, pad), (0, 0))))
    old = _torch(np.asarray(scale, np.float64).reshape(blocks, cols))
    zero = np.repeat(np.asarray(zero_point, np.float64).reshape(blocks, cols), group, axis=0)[:rows]
    q = _torch(np.pad(np.asarray(codes, np.float64) - zero, ((0, pad), (0, 0))))
    h = _torch(np.pad(np.asarray(hessian, np.float64), ((0, pad), (0, pad))))
    # A[c, g, k] = q_gᵀ H_gk q_k over channel c's column; b[c, g] = q_gᵀ (H w)_g
    A = torch.empty((cols, blocks, blocks), dtype=torch.float64)
    for k in range(blocks):
        part = slice(k * group, (k + 1) * group)
        hq = h[:, part] @ q[part]  # [in, out]: H's columns of block k times block k's codes
        A[:, :, k] = (q * hq).reshape(blocks, group, cols).sum(1).T
    b = (q * (h @ w)).reshape(blocks, group, cols).sum(1).T  # [out, blocks]
    empty = torch.diagonal(A, dim1=1, dim2=2) <= 0  # [out, blocks]: codes all at the zero point
    A = A + torch.diag_embed(empty.to(A.dtype))
    b = torch.where(empty, old.T, b)
    ridge = 1e-9 * torch.diagonal(A, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    new = torch.linalg.solve(A + ridge[:, None, None] * torch.eye(blocks, dtype=A.dtype), b)  # [out, blocks]

    def error(s):  # sᵀAs − 2bᵀs, the channel's error less its constant wᵀHw
        return (s * (A @ s[..., None])[..., 0]).sum(1) - 2 * (b * s).sum(1)

    better = (new > 0).all(1) & (error(new) < error(old.T)) & torch.isfinite(new).all(1)
    chosen = torch.where(better[:, None], new, old.T).T.numpy().astype(np.float32)
    chosen = np.maximum(chosen, numerics.MIN_SCALE)
    return chosen.reshape(np.shape(scale))


def estimate_scales(weight_in_out: np.ndarray, hessian: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                    spec: QuantSpec, rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(codes as int32 [in, out], scale): from the starting `scale`, `rounds` times round to nearest
    and refit the scales (`refit_scales`); each output channel keeps the codes and scales of its
    least-error round, so the result is never worse than plain rounding with `scale`."""
    w = np.asarray(weight_in_out, np.float32)

    def rounded(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = numerics.quantize(w, s, zero_point, spec).astype(np.int32)
        return codes, output_error(w - numerics.dequantize(codes, s, zero_point, spec), hessian)

    best_scale = np.asarray(scale, np.float32)
    best_codes, best_error = rounded(best_scale)
    current, codes = best_scale, best_codes
    for _ in range(rounds):
        current = refit_scales(w, hessian, codes, current, zero_point, spec)
        codes, error = rounded(current)
        better = error < best_error
        if not better.any():
            break
        best_error = np.where(better, error, best_error)
        best_codes = np.where(better[None, :], codes, best_codes)
        best_scale = np.where(better if best_scale.ndim == 1 else better[None, :], current, best_scale).astype(np.float32)
    return best_codes, best_scale
