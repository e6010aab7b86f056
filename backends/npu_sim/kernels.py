"""Vectorised numpy integer kernels of the simulated NPU (the semantics `reference.py` spells out in loops).

Conventions (TFLite / gemmlowp):
- A quantized tensor holds integers q meaning (q - zero_point) * scale.
- A real multiplier M > 0 is stored as (m0, shift) with m0 in [2^30, 2^31) and
  M = m0 * 2^(shift - 31); applying it is SaturatingRoundingDoublingHighMul (SRDHM) of the
  left-shifted value followed by RoundingDivideByPOT (round half away from zero).
- Accumulators are int32; numpy holds them in int64 so intermediate products never wrap.

MatMul accumulates through float32 BLAS in slices of the depth axis short enough that every
partial sum is an integer below 2^24 (|product| bound x slice length), which float32 represents
exactly whatever the summation order; the slices are added in int64. The result equals integer
accumulation bit for bit, at BLAS speed (numpy has no integer GEMM).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "INT_RANGES", "quantize_multiplier", "srdhm", "rounding_divide_by_pot", "multiply_by_quantized_multiplier",
    "requantize", "matmul", "add", "mul", "lut", "softmax", "quantize", "dequantize", "EXP_FRACTION_BITS",
    "SOFTMAX_OUT_BITS", "ADD_LEFT_SHIFT", "isqrt", "norm", "NORM_FRACTION_BITS", "NORM_GAMMA_BITS",
]

INT_RANGES = {
    "int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535),
    "int32": (-(2**31), 2**31 - 1), "int4": (-8, 7), "uint4": (0, 15),
}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EXP_FRACTION_BITS = 20  # softmax exp table entries are Q0.20 fixed point
SOFTMAX_OUT_BITS = 16  # softmax output multiplier fraction bits
ADD_LEFT_SHIFT = {8: 20, 16: 14}
NORM_FRACTION_BITS = 12  # fraction bits of the normalised value in the norm kernel
NORM_GAMMA_BITS = 16  # fraction bits of gamma / s_out
FLOAT32_EXACT = 2**24  # float32 holds every integer of magnitude up to this exactly  # headroom bits for add/sub rescaling (TFLite uses 20 for 8-bit)


def quantize_multiplier(real) -> tuple[np.ndarray, np.ndarray]:
    """(m0, shift) with real = m0 * 2^(shift - 31), m0 in [2^30, 2^31) (0 for a zero multiplier)."""
    real = np.atleast_1d(np.asarray(real, dtype=np.float64))
    mantissa, exponent = np.frexp(real)
    m0 = np.round(mantissa * 2.0**31).astype(np.int64)
    carry = m0 == 2**31
    m0 = np.where(carry, m0 // 2, m0)
    exponent = np.where(carry, exponent + 1, exponent).astype(np.int64)
    tiny = (real == 0) | (exponent < -31)
    return np.where(tiny, 0, m0), np.where(tiny, 0, exponent)


def srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SaturatingRoundingDoublingHighMul of int32 values: round(a*b / 2^31), half away from zero."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    total = ab + nudge
    high = np.where(total >= 0, total >> 31, -((-total) >> 31))  # C division truncates toward zero
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(overflow, INT32_MAX, high)


def rounding_divide_by_pot(x: np.ndarray, exponent) -> np.ndarray:
    """x / 2^exponent rounded to nearest, ties away from zero (gemmlowp RoundingDivideByPOT)."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: np.ndarray, m0, shift) -> np.ndarray:
    """x * M for M = (m0, shift), TFLite's MultiplyByQuantizedMultiplier."""
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = np.clip(np.asarray(x, dtype=np.int64) << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(srdhm(shifted, m0), right)


def _saturate(x: np.ndarray, dtype: str) -> np.ndarray:
    lo, hi = INT_RANGES[dtype]
    return np.clip(x, lo, hi).astype(_storage(dtype))


def _storage(dtype: str):
    return np.dtype({"int4": "int8", "uint4": "uint8"}.get(dtype, dtype))


def requantize(x, in_zp, m0, shift, out_zp, out_dtype: str) -> np.ndarray:
    """Change scale: out = zp_out + M * (x - zp_in), saturated to `out_dtype`."""
    centred = np.asarray(x, dtype=np.int64) - np.asarray(in_zp, dtype=np.int64)
    return _saturate(multiply_by_quantized_multiplier(centred, m0, shift) + out_zp, out_dtype)


def matmul(a, b, a_zp, b_zp, m0, shift, out_zp, out_dtype: str, bias=None) -> np.ndarray:
    """out = zp_out + M[c] * (Σ_k (a - za)(b - zb)[c] + bias[c]); per-channel M and zb along b's last axis."""
    acc = matmul_accumulate(a, b, a_zp, b_zp)
    if bias is not None:
        acc = acc + np.asarray(bias, dtype=np.int64)
    return _saturate(multiply_by_quantized_multiplier(acc, m0, shift) + out_zp, out_dtype)


def matmul_accumulate(a, b, a_zp, b_zp) -> np.ndarray:
    """The int32 accumulator Σ_k (a - za)(b - zb), batched with numpy broadcasting (exact: see module doc)."""
    a_c = np.asarray(a, dtype=np.float32) - np.float32(a_zp)
    b_c = np.asarray(b, dtype=np.float32) - np.asarray(b_zp, dtype=np.float32)
    bound = max(float(np.abs(a_c).max(initial=1.0)) * float(np.abs(b_c).max(initial=1.0)), 1.0)
    chunk = max(1, int(FLOAT32_EXACT // bound))
    depth = a_c.shape[-1]
    if chunk >= depth:
        return np.matmul(a_c, b_c).astype(np.int64)
    acc = None
    for k in range(0, depth, chunk):
        part = np.matmul(a_c[..., k:k + chunk], b_c[..., k:k + chunk, :]).astype(np.int64)
        acc = part if acc is None else acc + part
    return acc


def add(a, b, a_zp, b_zp, a_m0, a_shift, b_m0, b_shift, left_shift, out_m0, out_shift, out_zp, out_dtype: str,
        sign: int = 1) -> np.ndarray:
    """TFLite-style rescaled add (sign=-1: subtract): both inputs to a common int32 scale, sum, requantize."""
    a_ = multiply_by_quantized_multiplier((np.asarray(a, np.int64) - a_zp) << left_shift, a_m0, a_shift)
    b_ = multiply_by_quantized_multiplier((np.asarray(b, np.int64) - b_zp) << left_shift, b_m0, b_shift)
    total = a_ + sign * b_
    return _saturate(multiply_by_quantized_multiplier(total, out_m0, out_shift) + out_zp, out_dtype)


def mul(a, b, a_zp, b_zp, m0, shift, out_zp, out_dtype: str) -> np.ndarray:
    """out = zp_out + M * (a - za)(b - zb), M = sa*sb/so."""
    product = (np.asarray(a, np.int64) - a_zp) * (np.asarray(b, np.int64) - b_zp)
    return _saturate(multiply_by_quantized_multiplier(product, m0, shift) + out_zp, out_dtype)


def lut(x, table, offset: int) -> np.ndarray:
    """out = table[x - offset]: any elementwise function of one quantized input, tabulated at compile time."""
    return np.asarray(table)[np.asarray(x, np.int64) - offset]


def softmax(x, exp_table, out_multiplier: int, out_zp: int, out_dtype: str, mask=None) -> np.ndarray:
    """Integer softmax over the last axis.

    d = x - max(x) (masked positions excluded), e = exp_table[-d] (Q0.20 values of exp(d * s_in)),
    S = Σ e, out = zp + ((e * R) // S + 2^15) >> 16 with R = round(2^16 / s_out). A row with every
    position masked yields zp (probability 0).
    """
    x = np.asarray(x, dtype=np.int64)
    lo = np.iinfo(np.int64).min // 4
    if mask is not None:
        x = np.where(mask, x, lo)
    row_max = x.max(axis=-1, keepdims=True)
    valid = x > lo
    diff = np.where(valid, row_max - x, 0)
    diff = np.minimum(diff, len(exp_table) - 1)
    e = np.where(valid, np.asarray(exp_table, np.int64)[diff], 0)
    total = e.sum(axis=-1, keepdims=True)
    safe = np.maximum(total, 1)
    half = 1 << (SOFTMAX_OUT_BITS - 1)
    q = ((e * out_multiplier) // safe + half) >> SOFTMAX_OUT_BITS
    return _saturate(q + out_zp, out_dtype)


def isqrt(v) -> np.ndarray:
    """floor(sqrt(v)) of non-negative int64 values, exact (a float guess corrected by integer steps)."""
    v = np.asarray(v, dtype=np.int64)
    r = np.floor(np.sqrt(v.astype(np.float64))).astype(np.int64)
    for _ in range(2):
        r = np.where(r * r > v, r - 1, r)
        r = np.where((r + 1) * (r + 1) <= v, r + 1, r)
    return r


def norm(x, x_zp, center: bool, eps_q: int, gamma_q, beta_q, out_zp: int, out_dtype: str) -> np.ndarray:
    """Integer LayerNorm (center=True) / RMSNorm (center=False) over the last axis.

    With xc = x - zp, N the row length, S = Σxc (0 for RMSNorm), D = N·Σxc² - S² + eps_q:
    normalised = (N·xc - S) / sqrt(D). Fixed point with F = NORM_FRACTION_BITS:
    r = isqrt(D · 2^2F), n = round((N·xc - S) · 2^2F / r) (= normalised · 2^F),
    out = zp + RoundingDivideByPOT(n · gamma_q + beta_q, F + NORM_GAMMA_BITS), where gamma_q =
    round(gamma / s_out · 2^G) and beta_q = round(beta / s_out · 2^(F+G)) per channel.
    """
    xc = np.asarray(x, dtype=np.int64) - np.int64(x_zp)
    n = xc.shape[-1]
    total = xc.sum(axis=-1, keepdims=True) if center else np.zeros(xc.shape[:-1] + (1,), np.int64)
    squares = (xc * xc).sum(axis=-1, keepdims=True)
    d = n * squares - total * total + np.int64(eps_q)
    r = np.maximum(isqrt(d << (2 * NORM_FRACTION_BITS)), 1)
    num = (n * xc - total) << (2 * NORM_FRACTION_BITS + 1)
    normalised = (num + r) // (2 * r)
    y = normalised * np.asarray(gamma_q, np.int64) + np.asarray(beta_q, np.int64)
    return _saturate(rounding_divide_by_pot(y, NORM_FRACTION_BITS + NORM_GAMMA_BITS) + out_zp, out_dtype)


def quantize(x, scale, zero_point, out_dtype: str, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear in float32: saturate(round_half_even(x / scale) + zp)."""
    x = np.asarray(x, dtype=np.float32)
    scale = _along(np.asarray(scale, np.float32), x.ndim, axis)
    zp = _along(np.asarray(zero_point, np.int64), x.ndim, axis)
    return _saturate(np.rint(x / scale).astype(np.int64) + zp, out_dtype)


def dequantize(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear in float32: (q - zp) * scale."""
    q = np.asarray(q)
    scale = _along(np.asarray(scale, np.float32), q.ndim, axis)
    zp = _along(np.asarray(zero_point, np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)


def gather_dequantize(table, indices, scale, zero_point, axis: int, channel_axis: int | None) -> np.ndarray:
    """take(table, indices, axis) dequantized; a per-channel scale along the gathered axis is gathered too."""
    rows = np.take(table, np.asarray(indices, np.int64), axis=axis)
    if channel_axis is None:
        return dequantize(rows, scale, zero_point)
    if channel_axis != axis:
        shift = np.asarray(indices).ndim - 1 if channel_axis > axis else 0
        return dequantize(rows, scale, zero_point, channel_axis + shift)
    shape = [1] * rows.ndim
    index_shape = np.asarray(indices).shape
    shape[axis:axis + len(index_shape)] = index_shape
    s = np.take(np.asarray(scale, np.float32), np.asarray(indices, np.int64)).reshape(shape)
    z = np.take(np.asarray(zero_point, np.int64), np.asarray(indices, np.int64)).reshape(shape)
    return ((rows.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def _along(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """A per-channel parameter shaped to broadcast along `axis` (scalars pass through)."""
    if param.size == 1 or axis is None:
        return param.reshape(()) if param.size == 1 else param
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)
