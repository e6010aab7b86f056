"""GPTQ: weight rounding with second-order error compensation (Frantar et al., arXiv 2210.17323).

Rounding one input row of a linear weight at a time and spreading its rounding error over the
rows not yet rounded, weighted by the inverse Hessian of the layer's inputs (H = 2/n·XᵀX, from
`activations.InputHessian`), minimises ‖XW − XŴ‖² far better than round-to-nearest at 4 bits.
The sweep is `graphopt.sparsity.obs_sweep`'s (SparseGPT's too); this module chooses the grid and knows nothing of
graphs: the quantize pass calls it per weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from graphopt.errors import OptionError
from graphopt.quant import numerics
from graphopt.sparsity import obs_sweep

__all__ = ["GPTQResult", "gptq_quantize", "rtn_quantize"]


@dataclass
class GPTQResult:
    """A rounded weight in the caller's [in, out] layout.

    dequantized: float32 [in, out], the weight the quantized model computes with.
    codes: integer codes [in, out] (int64; the caller casts to the spec's dtype).
    scale, zero_point: per output channel ([out]) or per block of input rows ([in // block, out]),
      the layout of ONNX DequantizeLinear on an [in, out] weight (axis 1, or block axis 0).
    """

    dequantized: np.ndarray
    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray


def _check(weight: np.ndarray, hessian: np.ndarray, spec, block_size: int, damp: float, mask) -> None:
    if weight.ndim != 2:
        raise OptionError(f"gptq: weight must be 2-D [in, out], got shape {weight.shape}")
    rows = weight.shape[0]
    if hessian.shape != (rows, rows):
        raise OptionError(f"gptq: Hessian shape {hessian.shape} does not match weight input dim {rows}")
    if spec.granularity not in ("channel", "block", "tensor"):
        raise OptionError(f"gptq: granularity '{spec.granularity}' is not supported (tensor, channel, block)")
    expected = {"channel": 1, "block": 0}.get(spec.granularity)
    if expected is not None and spec.axis % 2 != expected:
        raise OptionError(
            f"gptq: an [in, out] weight takes channel scales along axis 1 and blocks along axis 0; "
            f"got granularity '{spec.granularity}' with axis {spec.axis}")
    if block_size < 1 or not 0 <= damp < 1:
        raise OptionError(f"gptq: block_size must be >= 1 and damp in [0, 1), got {block_size}, {damp}")
    if mask is not None and np.shape(mask) != weight.shape:
        raise OptionError(f"gptq: mask shape {np.shape(mask)} differs from weight shape {weight.shape}")


def _group_params(rows: np.ndarray, spec, grid: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each output channel over a group of its inputs ([out, group]):
    their min-max, or the MSE-optimal clipped range (numerics.mse_params)."""
    per_row = spec if spec.granularity == "tensor" else dataclasses.replace(spec, granularity="channel", axis=0, block_size=0)
    if grid == "mse":
        scale, zero_point = numerics.mse_params(rows, per_row)
    else:
        scale, zero_point = numerics.params_for(rows, per_row)
    return np.broadcast_to(scale, rows.shape[:1]), np.broadcast_to(zero_point, rows.shape[:1])


def _static_params(weight_in_out: np.ndarray, spec, grid: str) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points of every block of input rows ([ceil(in / block), out] each), from the
    weight as it is: act-order's static groups."""
    group = spec.block_size
    params = [_group_params(weight_in_out[g:g + group].T, spec, grid) for g in range(0, weight_in_out.shape[0], group)]
    return np.stack([p[0] for p in params]).astype(np.float32), np.stack([p[1] for p in params]).astype(np.int64)


def gptq_quantize(
    weight_in_out: np.ndarray,
    hessian: np.ndarray,
    spec,
    block_size: int = 128,
    damp: float = 0.01,
    mask: np.ndarray | None = None,
    grid: str = "minmax",
    act_order: bool = False,
) -> GPTQResult:
    """Round `weight_in_out` ([in, out], as MatMul(x, W) reads it) to `spec` with GPTQ.

    `hessian` is [in, in] (activations.InputHessian.hessian). Input rows are rounded by the OBS
    sweep of `graphopt.sparsity.obs_sweep`, in lazy batches of `block_size` rows; `damp` × mean(diag H)
    is added to the diagonal. In order of the rows, or with `act_order` by descending diagonal of H
    (the inputs that carry most energy first, while most rows are left to absorb their error).
    Per channel or per tensor, the grid comes from the weight; with spec.granularity "block", each
    group of spec.block_size input rows gets its own scales: in row order chosen from the
    error-updated weights when the sweep reaches the group (as the reference does), with
    `act_order` from the weight before the sweep (static groups: a block's rows are visited out of
    order, and its scales must exist before the first of them is rounded).
    `grid` "minmax" spans each group's range, "mse" clips it where rounding error is least.
    `mask` (bool [in, out], True = kept) keeps pruned weights exactly zero; their error is
    compensated by the kept ones. Inputs that never fire (zero Hessian diagonal) are zeroed.
    The result is always in the caller's row order.
    """
    import torch

    _check(weight_in_out, hessian, spec, block_size, damp, mask)
    weight = np.asarray(weight_in_out, np.float32)
    rows, cols = weight.shape
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(rows)
    W, hinv = obs_sweep.prepare(weight[order].T, np.asarray(hessian)[np.ix_(order, order)], damp, "gptq")  # [out, in]
    group = spec.block_size if spec.granularity == "block" else rows
    static = act_order and spec.granularity == "block"
    if spec.granularity == "block" and not static:  # a group's scales come from rows inside the current batch
        block_size = max(group, block_size // group * group)
    scales = np.zeros((-(-rows // group), cols), np.float32)  # a shorter last group when group does not divide
    zeros = np.zeros((-(-rows // group), cols), np.int64)
    if static:
        scales, zeros = _static_params(weight, spec, grid)
    codes = torch.zeros((rows, cols), dtype=torch.float32)  # [in, out], the caller's row order
    keep = None if mask is None else torch.from_numpy(np.ascontiguousarray(np.asarray(mask, bool)[order]))
    current = {}

    def params(g: int) -> tuple:
        return torch.from_numpy(scales[g]), torch.from_numpy(zeros[g].astype(np.float32))

    def replace(j: int, block, i: int):
        if static:
            scale, zero = params(order[j] // group)
        else:
            if j % group == 0:
                source = W if group == rows else block[i:i + group].T  # whole rows: the grid of the weight
                scales[j // group], zeros[j // group] = _group_params(source.numpy(), spec, grid)
                current["params"] = params(j // group)
            scale, zero = current["params"]
        q = torch.round(block[i] / scale).add_(zero).clamp_(spec.qmin, spec.qmax)
        if keep is not None:
            q = torch.where(keep[j], q, zero)
        codes[order[j]] = q
        return q.sub(zero).mul_(scale)

    obs_sweep.sweep(W, hinv, replace, block_size)
    codes = codes.numpy().astype(np.int64)
    if spec.granularity == "channel":
        scales, zeros = scales[0], zeros[0]
    elif spec.granularity == "tensor":
        scales, zeros = scales[0, 0], zeros[0, 0]
    return GPTQResult(numerics.dequantize(codes, scales, zeros, spec), codes, scales, zeros)


def rtn_quantize(weight_in_out: np.ndarray, spec) -> GPTQResult:
    """Round-to-nearest with the same grid and layout as `gptq_quantize` (its baseline)."""
    w = np.asarray(weight_in_out, dtype=np.float32)
    scale, zero_point = numerics.params_for(w, spec)
    codes = numerics.quantize(w, scale, zero_point, spec)
    return GPTQResult(numerics.dequantize(codes, scale, zero_point, spec), codes.astype(np.int64),
                      scale, zero_point)
