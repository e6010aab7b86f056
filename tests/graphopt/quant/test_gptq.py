"""GPTQ: beats round-to-nearest on the layer's own inputs, keeps the grid, honours masks."""

import numpy as np
import pytest

from graphopt.analysis.capture import InputHessian, capture
from graphopt.analysis.linear_sites import linear_sites
from graphopt.errors import OptionError
from graphopt.quant.gptq import gptq_quantize, rtn_quantize
from graphopt.quant.spec import QuantSpec

W4_BLOCK64 = QuantSpec("int4", "block", axis=0, block_size=64, symmetric=True)
W8_CHANNEL = QuantSpec("int8", "channel", axis=1, symmetric=True)


def _correlated(rows: int, features: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(features, features)) / np.sqrt(features)
    return (rng.normal(size=(rows, features)) @ mixing + 0.3 * rng.normal(size=(rows, features))).astype(np.float32)


def _hessian(x: np.ndarray) -> np.ndarray:
    acc = InputHessian()
    acc.update(x)
    return acc.hessian


def _error(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    return float(np.linalg.norm(x @ w - x @ w_hat))


def _beats_rtn(x, w, result, spec, margin: float) -> bool:
    """GPTQ's output error below `margin` times round-to-nearest's on the same inputs."""
    return _error(x, w, result.dequantized) < margin * _error(x, w, rtn_quantize(w, spec).dequantized)


GPTQ_OVER_RTN = 0.77  # measured 0.743 (int4 blocks of 64) and 0.749 (int8 per channel)


def test_gptq_beats_rtn_on_correlated_inputs():
    x = _correlated(512, 128)
    w = np.random.default_rng(1).normal(size=(128, 48)).astype(np.float32)
    h = _hessian(x)
    shuffled = np.random.default_rng(9).permutation(128)
    for spec in (W4_BLOCK64, W8_CHANNEL):
        gptq, rtn = gptq_quantize(w, h, spec, block_size=32), rtn_quantize(w, spec)
        assert _beats_rtn(x, w, gptq, spec, GPTQ_OVER_RTN), spec
        assert gptq.codes.min() >= spec.qmin and gptq.codes.max() <= spec.qmax
        # broken variant: the Hessian of misaligned input channels (1.31x RTN's error)
        misaligned = gptq_quantize(w, h[shuffled][:, shuffled], spec, block_size=32)
        assert not _beats_rtn(x, w, misaligned, spec, GPTQ_OVER_RTN), spec
    assert gptq.scale.shape == (48,) and rtn.scale.shape == (48,)


def test_mse_grid_rounds_4_bit_blocks_better():
    x = _correlated(512, 128)
    w = np.random.default_rng(6).standard_t(3, size=(128, 32)).astype(np.float32)  # heavy tails: clipping pays
    h = _hessian(x)
    minmax, mse = gptq_quantize(w, h, W4_BLOCK64), gptq_quantize(w, h, W4_BLOCK64, grid="mse")
    assert _error(x, w, mse.dequantized) < 0.93 * _error(x, w, minmax.dequantized)  # 0.913 measured
    assert np.mean(mse.scale < minmax.scale) > 0.5  # clipped: most groups take a narrower grid


def test_codes_and_scales_reconstruct_the_weight_in_onnx_layout():
    x = _correlated(256, 128)
    w = np.random.default_rng(2).normal(size=(128, 16)).astype(np.float32)
    result = gptq_quantize(w, _hessian(x), W4_BLOCK64)
    assert result.scale.shape == (2, 16) and result.zero_point.shape == (2, 16)
    expanded = np.repeat(result.scale, 64, axis=0)
    np.testing.assert_allclose(result.dequantized, result.codes * expanded, rtol=1e-6, atol=1e-7)


def test_uncorrelated_inputs_reduce_to_round_to_nearest():
    """With a diagonal Hessian no error moves to other rows: GPTQ is exactly RTN (negative case)."""
    w = np.random.default_rng(3).normal(size=(64, 8)).astype(np.float32)
    h = np.diag(np.random.default_rng(4).uniform(0.5, 2.0, 64))
    gptq, rtn = gptq_quantize(w, h, W8_CHANNEL, damp=0.0), rtn_quantize(w, W8_CHANNEL)
    np.testing.assert_array_equal(gptq.codes, rtn.codes)
    np.testing.assert_allclose(gptq.dequantized, rtn.dequantized, rtol=0, atol=1e-7)


def test_mask_keeps_pruned_weights_exactly_zero():
    x = _correlated(256, 64)
    rng = np.random.default_rng(5)
    keep = rng.random((64, 32)) > 0.5
    w = np.where(keep, rng.normal(size=(64, 32)), 0.0).astype(np.float32)
    result = gptq_quantize(w, _hessian(x), QuantSpec("uint8", "channel", axis=1, symmetric=False), mask=keep)
    assert np.all(result.dequantized[~keep] == 0.0)
    assert np.count_nonzero(result.dequantized[keep]) > 0.9 * keep.sum()


def test_dead_inputs_are_zeroed():
    x = _correlated(128, 32)
    x[:, 5] = 0.0
    w = np.random.default_rng(6).normal(size=(32, 4)).astype(np.float32)
    assert np.all(gptq_quantize(w, _hessian(x), W8_CHANNEL).dequantized[5] == 0.0)


@pytest.mark.parametrize("act_order", [False, True])
def test_a_shorter_last_block_is_a_group_of_its_own(act_order):
    """72 rows in blocks of 32: three groups, the last of 8 rows, as ONNX's blocked DequantizeLinear reads
    them. With uncorrelated inputs (H = I) GPTQ has no error to move: it is round-to-nearest on that grid;
    on correlated inputs it still beats it."""
    spec = QuantSpec("int4", "block", axis=0, block_size=32, symmetric=True)
    w = np.random.default_rng(4).normal(size=(72, 6)).astype(np.float32)
    w[64:] *= 0.1  # a last block of small weights: a padding or a neighbour's range would show in its scales
    plain = gptq_quantize(w, np.eye(72), spec, act_order=act_order)
    rtn = rtn_quantize(w, spec)
    assert plain.scale.shape == (3, 6)
    np.testing.assert_array_equal(plain.codes, rtn.codes)
    np.testing.assert_array_equal(plain.scale, rtn.scale)
    x = _correlated(512, 72)
    assert _beats_rtn(x, w, gptq_quantize(w, _hessian(x), spec, act_order=act_order), spec, 0.85)  # 0.73, 0.76


@pytest.mark.parametrize("kwargs, message", [
    ({"weight": np.zeros((4, 4, 4))}, "2-D"),
    ({"hessian": np.eye(3)}, "Hessian shape"),
    ({"spec": QuantSpec("int8", "channel", axis=0)}, "axis 1"),
    ({"spec": QuantSpec("int8", "token")}, "granularity 'token'"),
    ({"mask": np.ones((3, 3), bool)}, "mask shape"),
    ({"damp": 1.5}, "damp"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = {"weight": np.ones((64, 4), np.float32), "hessian": np.eye(64), "spec": W8_CHANNEL}
    args.update({k: v for k, v in kwargs.items() if k in args})
    extra = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises(OptionError, match=message):
        gptq_quantize(args["weight"], args["hessian"], args["spec"], **extra)


@pytest.mark.real
def test_gptq_beats_rtn_on_a_smollm2_layer(smollm2_onnx, smollm2_calib):
    """W4 block 64 on layer 3's down_proj with its calibration Hessian: lower ‖XW − XŴ‖ than RTN."""
    site = next(s for s in linear_sites(smollm2_onnx) if s.weight == "model.layers.3.mlp.down_proj.weight")
    rows = {}

    class Rows(InputHessian):
        def update(self, x):
            super().update(x)
            rows.setdefault("x", []).append(x.reshape(-1, x.shape[-1]))

    acc = capture(smollm2_onnx, smollm2_calib, [site.activation], lambda _: Rows(), progress=False)
    w = smollm2_onnx.graph.tensors()[site.weight].values
    gptq = gptq_quantize(w, acc[site.activation].hessian, W4_BLOCK64)
    rtn = rtn_quantize(w, W4_BLOCK64)
    x = np.concatenate(rows["x"])
    gptq_err, rtn_err = _error(x, w, gptq.dequantized), _error(x, w, rtn.dequantized)
    assert gptq_err < 0.26 * rtn_err, (gptq_err, rtn_err)  # 0.236 measured
    shuffled = np.random.default_rng(9).permutation(w.shape[0])  # broken variant: 1.32x RTN's error
    misaligned = gptq_quantize(w, acc[site.activation].hessian[shuffled][:, shuffled], W4_BLOCK64)
    assert not _error(x, w, misaligned.dequantized) < 0.26 * rtn_err


def _uneven(rows: int, features: int, seed: int = 0) -> np.ndarray:
    """Correlated inputs whose channels differ in energy by orders of magnitude (as LLM activations do)."""
    return _correlated(rows, features, seed) * np.exp(np.random.default_rng(seed + 1).normal(size=features)).astype(np.float32)


def test_act_order_rounds_energetic_inputs_first():
    """On inputs of uneven energy act-order cuts GPTQ's output error (measured 0.71x of row order, W4
    blocks of 64), its block scales staying in row order (the layout DequantizeLinear reads)."""
    x = _uneven(2048, 256)
    w = np.random.default_rng(1).normal(size=(256, 64)).astype(np.float32)
    h = _hessian(x)
    plain, ordered = gptq_quantize(w, h, W4_BLOCK64, grid="mse"), gptq_quantize(w, h, W4_BLOCK64, grid="mse", act_order=True)
    assert _error(x, w, ordered.dequantized) < 0.8 * _error(x, w, plain.dequantized)
    assert ordered.scale.shape == (4, 64)
    expanded = np.repeat(ordered.scale, 64, axis=0)
    np.testing.assert_allclose(ordered.dequantized, ordered.codes * expanded, rtol=1e-6, atol=1e-7)
    # broken variant: the Hessian of the reversed channels, misaligned with the weight
    reversed_h = h[::-1, ::-1]
    assert not _error(x, w, gptq_quantize(w, reversed_h, W4_BLOCK64, grid="mse", act_order=True).dequantized) \
        < 0.8 * _error(x, w, plain.dequantized)
