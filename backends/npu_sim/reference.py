"""Straightforward scalar reference of every integer kernel: Python ints, one element at a time.

Slow on purpose: each function is the kernel's definition written the way the gemmlowp / TFLite
reference code reads, so tests can demand exact equality from the vectorised `kernels.py`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from graphopt.backends.npu_sim.kernels import INT_RANGES, NORM_FRACTION_BITS, NORM_GAMMA_BITS, SOFTMAX_OUT_BITS

__all__ = ["srdhm", "rounding_divide_by_pot", "multiply_by_quantized_multiplier", "requantize", "matmul", "add",
           "mul", "lut", "softmax", "norm"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _div_trunc(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def srdhm(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    return _div_trunc(ab + nudge, 1 << 31)


def rounding_divide_by_pot(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def multiply_by_quantized_multiplier(x: int, m0: int, shift: int) -> int:
    left = max(shift, 0)
    right = max(-shift, 0)
    shifted = min(max(x * (1 << left), INT32_MIN), INT32_MAX)
    return rounding_divide_by_pot(srdhm(shifted, m0), right)


def _sat(v: int, dtype: str) -> int:
    lo, hi = INT_RANGES[dtype]
    return min(max(v, lo), hi)


def _scalar(params, index: int) -> int:
    params = np.atleast_1d(params)
    return int(params[index if params.size > 1 else 0])


def requantize(x, in_zp, m0, shift, out_zp, out_dtype):
    x = np.asarray(x)
    out = np.zeros(x.shape, dtype=np.int64)
    for idx in itertools.product(*map(range, x.shape)):
        out[idx] = _sat(multiply_by_quantized_multiplier(int(x[idx]) - int(in_zp), int(m0), int(shift)) + int(out_zp),
                        out_dtype)
    return out


def matmul(a, b, a_zp, b_zp, m0, shift, out_zp, out_dtype, bias=None):
    """2-D only: [M, K] @ [K, N] with per-channel (column) weight zero point and multiplier."""
    a, b = np.asarray(a), np.asarray(b)
    rows, depth = a.shape
    cols = b.shape[1]
    out = np.zeros((rows, cols), dtype=np.int64)
    for i in range(rows):
        for j in range(cols):
            acc = 0
            for k in range(depth):
                acc += (int(a[i, k]) - int(a_zp)) * (int(b[k, j]) - _scalar(b_zp, j))
            if bias is not None:
                acc += _scalar(bias, j)
            out[i, j] = _sat(multiply_by_quantized_multiplier(acc, _scalar(m0, j), _scalar(shift, j)) + int(out_zp),
                             out_dtype)
    return out


def add(a, b, a_zp, b_zp, a_m0, a_shift, b_m0, b_shift, left_shift, out_m0, out_shift, out_zp, out_dtype, sign=1):
    a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
    out = np.zeros(a.shape, dtype=np.int64)
    for idx in itertools.product(*map(range, a.shape)):
        x = multiply_by_quantized_multiplier((int(a[idx]) - int(a_zp)) * (1 << left_shift), int(a_m0), int(a_shift))
        y = multiply_by_quantized_multiplier((int(b[idx]) - int(b_zp)) * (1 << left_shift), int(b_m0), int(b_shift))
        total = x + sign * y
        out[idx] = _sat(multiply_by_quantized_multiplier(total, int(out_m0), int(out_shift)) + int(out_zp), out_dtype)
    return out


def mul(a, b, a_zp, b_zp, m0, shift, out_zp, out_dtype):
    a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
    out = np.zeros(a.shape, dtype=np.int64)
    for idx in itertools.product(*map(range, a.shape)):
        product = (int(a[idx]) - int(a_zp)) * (int(b[idx]) - int(b_zp))
        out[idx] = _sat(multiply_by_quantized_multiplier(product, int(m0), int(shift)) + int(out_zp), out_dtype)
    return out


def lut(x, table, offset):
    x = np.asarray(x)
    out = np.zeros(x.shape, dtype=np.int64)
    for idx in itertools.product(*map(range, x.shape)):
        out[idx] = int(table[int(x[idx]) - offset])
    return out


def softmax(x, exp_table, out_multiplier, out_zp, out_dtype, mask=None):
    x = np.asarray(x)
    mask = np.ones(x.shape, dtype=bool) if mask is None else np.broadcast_to(mask, x.shape)
    out = np.zeros(x.shape, dtype=np.int64)
    for row in itertools.product(*map(range, x.shape[:-1])):
        values = [int(v) for v in x[row]]
        keep = [bool(m) for m in mask[row]]
        kept = [v for v, k in zip(values, keep) if k]
        if not kept:
            out[row] = _sat(int(out_zp), out_dtype)
            continue
        top = max(kept)
        exps = [int(exp_table[min(top - v, len(exp_table) - 1)]) if k else 0 for v, k in zip(values, keep)]
        total = sum(exps)
        for j, e in enumerate(exps):
            q = ((e * int(out_multiplier)) // total + (1 << (SOFTMAX_OUT_BITS - 1))) >> SOFTMAX_OUT_BITS
            out[row + (j,)] = _sat(q + int(out_zp), out_dtype)
    return out


def norm(x, x_zp, center, eps_q, gamma_q, beta_q, out_zp, out_dtype):
    x = np.asarray(x)
    gamma = np.broadcast_to(np.asarray(gamma_q), x.shape[-1:])
    beta = np.broadcast_to(np.asarray(beta_q), x.shape[-1:])
    frac = NORM_FRACTION_BITS
    out = np.zeros(x.shape, dtype=np.int64)
    for row in itertools.product(*map(range, x.shape[:-1])):
        xc = [int(v) - int(x_zp) for v in x[row]]
        n = len(xc)
        total = sum(xc) if center else 0
        d = n * sum(v * v for v in xc) - total * total + int(eps_q)
        r = max(math.isqrt(d << (2 * frac)), 1)
        for j, v in enumerate(xc):
            normalised = (((n * v - total) << (2 * frac + 1)) + r) // (2 * r)
            y = normalised * int(gamma[j]) + int(beta[j])
            out[row + (j,)] = _sat(rounding_divide_by_pot(y, frac + NORM_GAMMA_BITS) + int(out_zp), out_dtype)
    return out
