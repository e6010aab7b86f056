"""QuantSpec grids, scale/zero point, quantize/dequantize against ONNX Runtime's QDQ arithmetic."""

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.errors import OptionError
from graphopt.quant import QuantSpec, dtype_for, numerics


@pytest.mark.parametrize("dtype, lo, hi, bits, signed", [
    ("int4", -8, 7, 4, True), ("uint4", 0, 15, 4, False), ("int8", -128, 127, 8, True),
    ("uint8", 0, 255, 8, False), ("int16", -32768, 32767, 16, True), ("uint16", 0, 65535, 16, False),
])
def test_spec_grid(dtype, lo, hi, bits, signed):
    spec = QuantSpec(dtype)
    assert (spec.qmin, spec.qmax, spec.bits, spec.signed) == (lo, hi, bits, signed)
    assert spec.np_dtype.itemsize == (1 if bits < 16 else 2)


def test_spec_errors_name_the_option():
    with pytest.raises(OptionError, match="dtype"):
        QuantSpec("int3")
    with pytest.raises(OptionError, match="needs an axis"):
        QuantSpec("int8", "channel")
    with pytest.raises(OptionError, match="block_size"):
        QuantSpec("int4", "block", axis=0)
    with pytest.raises(OptionError, match="bit width"):
        dtype_for(3, True)
    assert dtype_for(8, True) == "int8" and dtype_for(16, False) == "uint16"


def test_scale_zero_point_conventions():
    sym = QuantSpec("int8")
    scale, zp = numerics.scale_zero_point(-1.0, 0.5, sym)
    assert scale == np.float32(1.0 / 127) and zp == 0
    scale, zp = numerics.scale_zero_point(-1.0, 3.0, QuantSpec("uint8", symmetric=False))
    assert np.isclose(scale, 4.0 / 255) and zp == round(1.0 / (4.0 / 255))
    # ranges are widened to hold 0: a positive-only range keeps zero point at qmin
    scale, zp = numerics.scale_zero_point(2.0, 3.0, QuantSpec("uint8", symmetric=False))
    assert zp == 0 and np.isclose(scale, 3.0 / 255)
    scale, zp = numerics.scale_zero_point(0.0, 0.0, sym)
    assert scale > 0


def _within_half_a_step(x, y, spec) -> bool:
    """Every value of `y` within half a quantization step (of x's own grid) of `x`."""
    scale, _ = numerics.params_for(x, spec)
    return bool(np.all(np.abs(y - x) <= numerics.expand_param(scale, x.shape, spec) / 2 + 1e-7))


def test_zero_is_exact_and_error_bounded():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 48)).astype(np.float32)
    x[::3] = 0.0
    for spec in [QuantSpec("int8", "channel", axis=1), QuantSpec("uint8", symmetric=False),
                 QuantSpec("int4", "block", axis=0, block_size=16), QuantSpec("uint16", "token", symmetric=False)]:
        y = numerics.fake_quant(x, spec)
        assert np.all(y[::3] == 0.0), spec
        assert _within_half_a_step(x, y, spec), spec
        # broken variant: half the scale clips the outer half of the range (8 to 28 % of values out)
        scale, zero_point = numerics.params_for(x, spec)
        assert not _within_half_a_step(x, numerics.fake_quant(x, spec, scale / 2, zero_point), spec), spec


@pytest.mark.parametrize("rows, block, axis", [(64, 16, 0), (72, 32, 0), (200, 64, 1)])  # 72, 200: a shorter last block
def test_block_layout_matches_onnx(rows, block, axis):
    """Per-block params are laid out as DequantizeLinear reads them (ceil(rows / block) blocks, the
    last one shorter when block does not divide rows, with the range of its own rows); ORT agrees bit for bit."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    w = rng.standard_normal((rows, 8)).astype(np.float32) * np.linspace(0.5, 4.0, rows, dtype=np.float32)[:, None]
    w = np.ascontiguousarray(w if axis == 0 else w.T)
    spec = QuantSpec("int4", "block", axis=axis, block_size=block, symmetric=True)
    scale, zp = numerics.params_for(w, spec)
    blocks = -(-rows // block)
    assert scale.shape == ((blocks, 8) if axis == 0 else (8, blocks))
    tail = np.take(w, np.arange((blocks - 1) * block, rows), axis=axis)
    np.testing.assert_array_equal(np.take(scale, [blocks - 1], axis=axis).ravel(),
                                  np.abs(tail).max(axis=axis) / 7)  # the tail's own range, not a padding's
    q = numerics.quantize(w, scale, zp, spec)
    assert q.shape == w.shape
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis, block_size=block)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [
        onnx.numpy_helper.from_array(q, "q"), onnx.numpy_helper.from_array(scale, "s"),
        onnx.numpy_helper.from_array(zp.astype(spec.np_dtype), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(y, numerics.dequantize(q, scale, zp, spec))
    assert np.abs(y - w).max() <= np.abs(w).max() / 7 / 2 + 1e-6  # half a step of the widest block
    assert np.array_equal(numerics.fake_quant(w, spec), y)


def test_blocks_round_trip_and_errors():
    x = np.arange(24.0).reshape(6, 4)
    blocks = numerics.to_blocks(x, 0, 3)
    assert blocks.shape == (2, 3, 4)
    np.testing.assert_array_equal(numerics.from_blocks(blocks, 0), x)
    ragged = numerics.to_blocks(x, 0, 4)  # the last block repeats its last row, or holds `fill`
    assert ragged.shape == (2, 4, 4) and np.array_equal(ragged[1, 2:], x[[5, 5]])
    assert np.array_equal(numerics.to_blocks(x, 0, 4, fill=0.0)[1, 2:], np.zeros((2, 4)))
    np.testing.assert_array_equal(numerics.from_blocks(ragged, 0, 6), x)
    with pytest.raises(OptionError, match="out of range"):
        numerics.params_for(x, QuantSpec("int8", "channel", axis=5))


@pytest.mark.parametrize("spec", [
    QuantSpec("uint8", "channel", axis=1, symmetric=False),
    QuantSpec("int8", "channel", axis=0, symmetric=True),
    QuantSpec("int4", "block", axis=0, block_size=16, symmetric=True),
    QuantSpec("uint4", "block", axis=0, block_size=40, symmetric=False),  # 96 rows: a last block of 16
    QuantSpec("uint8", "tensor", symmetric=False),
])
def test_large_tensors_are_quantized_in_row_blocks_with_the_same_codes(spec, monkeypatch):
    """Quantizing a block of rows at a time (bounded temporaries for multi-GB weights) gives the
    codes and values of the one-shot formula; a block seam that mixes up parameters would not."""
    x = np.random.default_rng(3).standard_normal((96, 40)).astype(np.float32)
    scale, zp = numerics.params_for(x, spec)
    s = numerics.expand_param(np.asarray(scale, np.float32), x.shape, spec)
    z = numerics.expand_param(np.asarray(zp), x.shape, spec)
    expected = np.clip(np.round(x / s) + z, spec.qmin, spec.qmax).astype(np.int32)
    monkeypatch.setattr(numerics, "CHUNK_BYTES", 7 * 40 * 4)  # 7 rows (or blocks) at a time
    codes = numerics.quantize(x, scale, zp, spec)
    np.testing.assert_array_equal(codes.astype(np.int32), expected)
    back = numerics.dequantize(codes, scale, zp, spec)
    np.testing.assert_array_equal(back, ((expected - z.astype(np.int32)).astype(np.float32) * s).astype(np.float32))
