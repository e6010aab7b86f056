"""onnxruntime's contrib weight layouts from graphopt's integer codes, and back.

`MatMulNBits` (com.microsoft) multiplies by a weight quantized in blocks along K and stored as
B uint8 [N, k_blocks, block_size * bits / 8]: each block's unsigned codes K-contiguous, two 4-bit
codes a byte (element 2i in the low nibble), scales [N, k_blocks], zero points packed the same way
(absent: 2^(bits-1)). graphopt's QDQ weight is DequantizeLinear(codes [K, N], scale, zero point)
per tensor, per output channel (axis 1) or per block along K (axis 0, block_size). `nbits_weight`
writes the one as the other, exactly: an unsigned code is the signed code + 2^(bits-1) and its zero
point moves with it, so (code - zero point) · scale is the same number in both forms; per-channel
and per-tensor scales repeat over the blocks; K is padded to whole blocks with zero-point codes
(weights of exactly 0, which A never meets). `dequantize_nbits` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.errors import UnsupportedGraphError

__all__ = ["NBitsWeight", "nbits_weight", "dequantize_nbits", "NBITS"]

NBITS = (4, 8)  # MatMulNBits widths the CPU kernels serve (2 exists, but graphopt makes no 2-bit codes)


@dataclass
class NBitsWeight:
    """The inputs and attributes of a MatMulNBits for one weight."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)], None: all 2^(bits-1)
    K: int
    N: int
    bits: int
    block_size: int


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (last axis even for 4 bits) -> bytes along the last axis, low nibble first."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed.astype(np.int32)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.int32)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def nbits_weight(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, *, bits: int,
                 signed: bool, block_size: int | None = None, channel_block: int = 64,
                 where: str = "weight") -> NBitsWeight:
    """The MatMulNBits form of DequantizeLinear(codes [K, N], scale, zero_point): `block_size` for
    scales [K / block_size, N] (blocks along K), None for a scale per output channel ([N]) or one
    for the tensor (then blocks of `channel_block`, each holding the channel's scale)."""
    if bits not in NBITS:
        raise UnsupportedGraphError(f"{where}: {bits}-bit codes have no MatMulNBits form (bits {NBITS})")
    K, N = codes.shape
    offset = 1 << (bits - 1) if signed else 0
    unsigned = codes.astype(np.int32) + offset
    zp = np.zeros(1, np.int32) if zero_point is None else np.asarray(zero_point, np.int32)
    zp = zp + offset
    scale = np.asarray(scale, np.float32)
    if block_size is None:
        block = channel_block
        blocks = -(-K // block)
        scales = np.broadcast_to(scale.reshape(-1)[None] if scale.size > 1 else scale.reshape(1, 1), (blocks, N))
        zps = np.broadcast_to(zp.reshape(-1)[None] if zp.size > 1 else zp.reshape(1, 1), (blocks, N))
    else:
        block = block_size
        blocks = -(-K // block)
        if scale.shape != (blocks, N):
            raise UnsupportedGraphError(f"{where}: block scales of shape {scale.shape}, expected {(blocks, N)}")
        scales = scale
        zps = np.broadcast_to(zp if zp.size > 1 else zp.reshape(1, 1), (blocks, N))
    if block < 16 or block & (block - 1):
        raise UnsupportedGraphError(f"{where}: MatMulNBits needs blocks of a power of two >= 16, got {block}")
    padded = np.empty((blocks * block, N), np.int32)
    padded[:K] = unsigned
    padded[K:] = zps[-1]  # codes equal to their zero point: weights of exactly 0
    b = _pack(padded.T.reshape(N, blocks, block), bits)
    zps = np.ascontiguousarray(zps.T)  # [N, blocks]
    zero_points = None
    if not np.all(zps == 1 << (bits - 1)):
        if bits == 4 and blocks % 2:
            zps = np.concatenate([zps, np.zeros((N, 1), np.int32)], axis=1)
        zero_points = _pack(zps, bits)
    return NBitsWeight(np.ascontiguousarray(b), np.ascontiguousarray(scales.T, dtype=np.float32), zero_points,
                       K, N, bits, block)


def dequantize_nbits(weight: NBitsWeight) -> np.ndarray:
    """The float weight [K, N] a MatMulNBits multiplies by: (code - zero point) · scale, in float32
    as DequantizeLinear computes it."""
    N, blocks, _ = weight.packed.shape
    codes = _unpack(weight.packed, weight.bits)  # [N, blocks, block]
    if weight.zero_points is None:
        zps = np.full((N, blocks), 1 << (weight.bits - 1), np.int32)
    else:
        zps = _unpack(weight.zero_points, weight.bits)[:, :blocks]
    values = (codes - zps[..., None]).astype(np.float32) * weight.scales[..., None]
    return np.ascontiguousarray(values.reshape(N, -1)[:, :weight.K].T)
