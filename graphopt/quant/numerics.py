"""Quantization arithmetic in numpy: ranges to scale/zero point, quantize, dequantize, fake-quant.

One implementation used by the ONNX quantize pass, fold_encodings, the observers, GPTQ and the
QAT code (which mirrors these formulas in torch). Conventions:

- q = clip(round(x / scale) + zero_point, qmin, qmax); x̂ = (q − zero_point) · scale
  (round half to even, as ONNX QuantizeLinear does).
- Ranges always include 0, so 0.0 is exactly representable (pruned weights stay exactly zero).
- Symmetric: scale = max|x| / (2^(bits−1) − 1), zero point = 0 (signed) or 2^(bits−1) (unsigned).
- Asymmetric: scale = (max − min) / (qmax − qmin), zero point = qmin − round(min / scale).
- Parameter layout follows ONNX DequantizeLinear: per-tensor scalars, per-channel 1-D arrays
  along `spec.axis`, per-block arrays shaped like x with `spec.axis` divided by `block_size`,
  rounded up: when `block_size` does not divide the axis the last block is shorter (ONNX's
  ceil(D / block_size) blocks), and its parameters come from its own elements only.
"""

from __future__ import annotations

import numpy as np

from graphopt.errors import OptionError
from graphopt.files.mapping import drop_pages
from graphopt.quant.spec import QuantSpec

__all__ = [
    "scale_zero_point", "tensor_range", "params_for", "quantize", "dequantize", "fake_quant",
    "to_blocks", "from_blocks", "expand_param", "mse_params", "smooth_scales", "MIN_SCALE", "to_half", "is_half",
    "offset_params", "quantize_with_offset",
]

MIN_SCALE = 1e-12  # an all-zero range still gets a usable positive scale


def scale_zero_point(lo, hi, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int64) for ranges [lo, hi] (arrays broadcast elementwise)."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if spec.symmetric:
        amax = np.maximum(-lo, hi)
        scale = np.maximum(amax / ((1 << (spec.bits - 1)) - 1), MIN_SCALE).astype(np.float32)
        middle = 0 if spec.signed else 1 << (spec.bits - 1)
        return scale, np.full(scale.shape, middle, dtype=np.int64)
    scale = np.maximum((hi - lo) / (spec.qmax - spec.qmin), MIN_SCALE).astype(np.float32)
    zero_point = np.clip(spec.qmin - np.round(lo / scale.astype(np.float64)), spec.qmin, spec.qmax)
    return scale, zero_point.astype(np.int64)


def _axis(spec: QuantSpec, ndim: int) -> int:
    axis = spec.axis if spec.axis is not None else -1
    if not -ndim <= axis < ndim:
        raise OptionError(f"quantization axis {spec.axis} is out of range for a {ndim}-D tensor")
    return axis % ndim


def to_blocks(x: np.ndarray, axis: int, block_size: int, fill: float | None = None) -> np.ndarray:
    """x with `axis` split into (ceil(D / block_size), block_size), the block elements on a new
    axis+1 (a view when block_size divides D). A shorter last block is padded to block_size: with
    `fill`, or by repeating its last element (None), so its min, max and max |x| are its own."""
    extra = -x.shape[axis] % block_size
    if extra:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, extra)
        x = np.pad(x, pad, mode="edge") if fill is None else np.pad(x, pad, constant_values=fill)
    shape = x.shape[:axis] + (x.shape[axis] // block_size, block_size) + x.shape[axis + 1:]
    return x.reshape(shape)


def from_blocks(x: np.ndarray, axis: int, length: int | None = None) -> np.ndarray:
    """Undo `to_blocks`: merge axes `axis` and `axis + 1`, keeping the first `length` elements
    along the merged axis (all when None: a padded last block stays padded)."""
    merged = x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])
    return merged if length is None else np.take(merged, np.arange(length), axis=axis)


def expand_param(param: np.ndarray, shape: tuple[int, ...], spec: QuantSpec) -> np.ndarray:
    """A scale/zero-point array in ONNX layout, broadcastable against a tensor of `shape`."""
    param = np.asarray(param)
    if spec.granularity == "tensor" or param.ndim == 0 or param.size == 1 and spec.granularity != "block":
        return param.reshape(())
    axis = _axis(spec, len(shape))
    if spec.granularity == "channel":
        view = [1] * len(shape)
        view[axis] = param.size
        return param.reshape(view)
    if spec.granularity == "block":  # a shorter last block: its parameters cover what is left of the axis
        return np.take(np.repeat(param, spec.block_size, axis=axis), np.arange(shape[axis]), axis=axis)
    return param  # token: already [..., 1] from params_for


def tensor_range(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of x at the spec's granularity, in the ONNX parameter layout; a large x is read
    a block of rows at a time (each block's pages dropped after, when x is memory-mapped)."""
    x = np.asarray(x, dtype=np.float32)
    if spec.granularity == "token":
        return x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    if x.ndim == 0 or spec.granularity == "tensor" or (spec.granularity == "channel" and _axis(spec, x.ndim) != 0):
        # reduced over axis 0 (and others): fold the row blocks' partial results
        keep = None if spec.granularity == "tensor" or x.ndim == 0 else _axis(spec, x.ndim)
        others = tuple(i for i in range(x.ndim) if i != keep)
        lo = hi = None
        for part, _ in _by_rows(x.shape or (1,), 4):
            chunk = x[part] if x.ndim else x
            clo, chi = chunk.min(axis=others), chunk.max(axis=others)
            lo = clo if lo is None else np.minimum(lo, clo)
            hi = chi if hi is None else np.maximum(hi, chi)
            drop_pages(chunk)
        return np.asarray(lo), np.asarray(hi)
    axis = _axis(spec, x.ndim)
    if spec.granularity == "channel":  # channels on axis 0: each row block gives its channels' ranges
        others = tuple(range(1, x.ndim))
        parts = [(x[part].min(axis=others), x[part].max(axis=others), drop_pages(x[part])) for part, _ in
                 _by_rows(x.shape, 4)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    blocks = to_blocks(x, axis, spec.block_size)
    return blocks.min(axis=axis + 1), blocks.max(axis=axis + 1)


def params_for(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Min-max scale and zero point of x itself (weights, RTN)."""
    lo, hi = tensor_range(x, spec)
    return scale_zero_point(lo, hi, spec)


def offset_params(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and float offset of x's exact range per group of an unsigned spec: x̂ = q · scale + offset,
    scale = (max − min) / qmax, offset = min. Unlike a zero point, the range is not widened to hold 0,
    so a group whose values lie on such a grid (a GGUF Q4_1 block) is reproduced exactly."""
    if spec.signed:
        raise OptionError(f"offset quantization needs unsigned codes, got {spec.dtype}")
    lo, hi = tensor_range(x, spec)
    scale = np.maximum((hi.astype(np.float64) - lo) / spec.qmax, MIN_SCALE).astype(np.float32)
    return scale, np.asarray(lo, np.float32)


def to_half(x: np.ndarray, *, positive: bool = False) -> np.ndarray:
    """x rounded to the nearest float16 value, as float32 (GGUF and MLX store scales and offsets so);
    `positive`: a value that rounds to 0 becomes float16's smallest positive one (a usable scale).
    OverflowError for a value past float16's range (65504)."""
    x = np.asarray(x, np.float32)
    if np.any(np.abs(x) > np.finfo(np.float16).max):
        raise OverflowError(f"{float(np.abs(x).max()):g} is past float16's range")
    half = x.astype(np.float16).astype(np.float32)
    return np.maximum(half, np.float32(2.0 ** -24)) if positive else half


def is_half(x: np.ndarray) -> bool:
    """Whether every value of x is a float16 value: finite, within float16's range, not rounded by it."""
    x = np.asarray(x, np.float32)
    if not np.all(np.isfinite(x)) or np.any(np.abs(x) > np.finfo(np.float16).max):
        return False
    return bool(np.array_equal(x.astype(np.float16).astype(np.float32), x))


def quantize_with_offset(x: np.ndarray, scale, offset, spec: QuantSpec) -> np.ndarray:
    """Codes q of x̂ = q · scale + offset (`offset_params`' layout), zero point 0."""
    shifted = np.asarray(x, np.float32) - expand_param(np.asarray(offset, np.float32), np.shape(x), spec)
    return quantize(shifted, scale, np.zeros(np.shape(scale), np.int64), spec)


CHUNK_BYTES = 32 << 20  # rows of a large tensor handled at a time: temporaries stay this small


def _param_views(x: np.ndarray, scale, zero_point, spec: QuantSpec):
    """(x reshaped so the parameters broadcast against it, scale, zero point): per block, x is
    viewed as [..., blocks, block_size, ...] (a shorter last block padded: `to_blocks`) and the
    parameters as [..., blocks, 1, ...], so no parameter is ever expanded to x's full size."""
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point)
    if spec.granularity != "block":
        return x, expand_param(s, x.shape, spec), expand_param(z, x.shape, spec)
    axis = _axis(spec, x.ndim)
    return to_blocks(x, axis, spec.block_size), np.expand_dims(s, axis + 1), np.expand_dims(z, axis + 1)


def _unblocked(values: np.ndarray, shape: tuple[int, ...], spec: QuantSpec) -> np.ndarray:
    """`_param_views`' blocked layout back to `shape` (a padded last block cut)."""
    if spec.granularity != "block":
        return values
    return from_blocks(values, _axis(spec, len(shape)), shape[_axis(spec, len(shape))])


def _by_rows(shape: tuple[int, ...], itemsize: int, *params):
    """Row slices of a tensor of `shape` (axis 0) of at most CHUNK_BYTES each, and each parameter's
    matching part (a parameter without that axis is used whole)."""
    rows = max(1, CHUNK_BYTES // max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64))))
    for start in range(0, max(shape[0], 1) if shape else 1, rows):
        part = slice(start, start + rows)
        yield part, [p[part] if p.ndim == len(shape) and p.shape[0] > 1 else p for p in params]


def quantize(x: np.ndarray, scale, zero_point, spec: QuantSpec) -> np.ndarray:
    """Integer codes of x in the spec's numpy type (ml_dtypes int4/uint4 for 4 bits). A large x is
    done a block of rows at a time, so the temporaries never approach x's own size."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        x = x.reshape(1)
        return quantize(x, scale, zero_point, spec).reshape(())
    shape = x.shape
    x, s, z = _param_views(x, scale, zero_point, spec)
    codes = np.empty(x.shape, dtype=spec.np_dtype)
    for part, (sp, zp) in _by_rows(x.shape, 4, s, z):
        q = np.rint(x[part] / sp)
        q += zp
        np.clip(q, spec.qmin, spec.qmax, out=q)
        codes[part] = q.astype(np.int32).astype(spec.np_dtype)
        drop_pages(x[part])  # a memory-mapped weight's rows, once read, need not stay
    return _unblocked(codes, shape, spec)


def dequantize(q: np.ndarray, scale, zero_point, spec: QuantSpec) -> np.ndarray:
    """Float32 values of codes q: (q − zero_point) · scale, as ONNX DequantizeLinear computes them
    (a block of rows at a time for a large q)."""
    q = np.asarray(q)
    if q.ndim == 0:
        return dequantize(q.reshape(1), scale, zero_point, spec).reshape(())
    shape = q.shape
    q, s, z = _param_views(q, scale, zero_point, spec)
    z = np.asarray(z).astype(np.int32)
    out = np.empty(q.shape, dtype=np.float32)
    for part, (sp, zp) in _by_rows(q.shape, 4, s, z):
        out[part] = (q[part].astype(np.int32) - zp).astype(np.float32) * sp
    return _unblocked(out, shape, spec)


def fake_quant(x: np.ndarray, spec: QuantSpec, scale=None, zero_point=None) -> np.ndarray:
    """dequantize(quantize(x)); without scale/zero point, x's own min-max parameters (per token
    for the dynamic "token" granularity)."""
    if scale is None:
        scale, zero_point = params_for(x, spec)
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec)


def _group_error(x: np.ndarray, approx: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Squared error summed per parameter group (the layout of params_for's scale)."""
    err = (x - approx) ** 2
    if spec.granularity == "tensor":
        return np.asarray(err.sum())
    axis = _axis(spec, x.ndim)
    if spec.granularity == "channel":
        return err.sum(axis=tuple(i for i in range(x.ndim) if i != axis))
    return to_blocks(err, axis, spec.block_size, fill=0.0).sum(axis=axis + 1)


def mse_params(x: np.ndarray, spec: QuantSpec, steps: int = 20, lowest: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-group clipped ranges minimising ‖x − fake_quant(x)‖² (weights): each group's min-max
    range is shrunk by the factor in [lowest, 1] that rounds it best. At 4 bits this recovers
    much of what round-to-nearest with full ranges loses; at 8 bits it is close to min-max."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = tensor_range(x, spec)
    best_scale, best_zp = scale_zero_point(lo, hi, spec)
    best_err = _group_error(x, fake_quant(x, spec, best_scale, best_zp), spec)
    for factor in np.linspace(1.0, lowest, steps)[1:]:
        scale, zp = scale_zero_point(lo * factor, hi * factor, spec)
        err = _group_error(x, fake_quant(x, spec, scale, zp), spec)
        better = err < best_err
        best_scale = np.where(better, scale, best_scale).astype(np.float32)
        best_zp = np.where(better, zp, best_zp)
        best_err = np.minimum(err, best_err)
    return best_scale, best_zp


def smooth_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant migration factors s_j = max|X_j|^α / max|W_j|^(1−α) per input channel j.

    X/s and s·W compute the same product; the activation's outlier channels shrink by s while
    the weights (easier to quantize, per channel) absorb them. Channels that never fire keep 1.
    """
    act = np.asarray(act_absmax, dtype=np.float64)
    wgt = np.maximum(np.asarray(weight_absmax, dtype=np.float64), 1e-8)
    scales = np.where(act > 0, act**alpha / wgt ** (1.0 - alpha), 1.0)
    return np.clip(scales, 1e-4, 1e4).astype(np.float32)
