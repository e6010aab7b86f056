"""Encodings I/O: exact round trips (1.0.0, 0.6.1), the QNN offset / ONNX zero-point mapping,
extraction from QDQ graphs, and errors naming the entry."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.ir import Model
from graphopt.quant import QuantSpec, numerics
from graphopt.quant.encodings import Encoding, EncodingError, Encodings

RNG = np.random.default_rng(0)
W = RNG.standard_normal((64, 32)).astype(np.float32)


def _encodings() -> Encodings:
    found = Encodings()
    specs = {"w8": QuantSpec("int8", "channel", axis=1), "w4": QuantSpec("int4", "block", axis=0, block_size=16),
             "a8": QuantSpec("uint8", symmetric=False), "a16": QuantSpec("uint16", symmetric=False)}
    for name, spec in specs.items():
        scale, zp = numerics.params_for(W + (1.0 if name == "a16" else 0.0), spec)
        found.add(Encoding.from_params(name, scale, zp, spec), "param" if name.startswith("w") else "activation")
    found.add(Encoding("kept_float", 16, "float"), "activation")
    return found


def test_qnn_offset_to_onnx_zero_point():
    """offset = round(min/scale) on the unsigned grid; zero_point = qmin - offset on ONNX's type."""
    uint = Encoding.from_params("a", np.float32(0.1), np.int64(30), QuantSpec("uint8", symmetric=False))
    assert uint.offset.tolist() == [-30] and uint.zero_point().tolist() == [30]
    assert uint.min[0] == pytest.approx(-3.0) and uint.max[0] == pytest.approx(22.5)
    sym = Encoding.from_params("w", np.float32(0.1), np.int64(0), QuantSpec("int8"))
    assert sym.offset.tolist() == [-128] and sym.spec.dtype == "int8"
    assert round(float(sym.min[0] / sym.scale[0])) == -128
    sym4 = Encoding.from_params("w", np.float32(0.1), np.int64(0), QuantSpec("int4"))
    assert sym4.offset.tolist() == [-8] and sym4.zero_point().tolist() == [0]


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1"])
def test_file_round_trip_is_exact(tmp_path, version):
    found = _encodings()
    if version == "0.6.1":
        del found.params["w4"]  # 0.6.1 has no blocks
        found.params["w8"] = found.params["w8"].with_axis(None)  # nor axes
    path = found.write(tmp_path / "enc.json", version)
    again = Encodings.read(path)
    assert again == found
    data = json.loads(path.read_text())
    assert data["version"] == version
    if version == "1.0.0":
        entry = next(e for e in data["param_encodings"] if e["name"] == "w4")
        assert entry["enc_type"] == "PER_BLOCK" and entry["block_size"] == 16 and entry["bw"] == 4
        assert entry["is_sym"] is True and entry["dtype"] == "INT"
    else:
        assert data["activation_encodings"]["a8"][0]["is_symmetric"] == "False"
        assert len(data["param_encodings"]["w8"]) == 32


def test_params_restore_the_onnx_layout():
    found = _encodings()
    for name, spec in [("w8", QuantSpec("int8", "channel", axis=1)), ("w4", QuantSpec("int4", "block", axis=0, block_size=16))]:
        scale, zp = numerics.params_for(W, spec)
        got_scale, got_zp = found[name].params(W.shape)
        np.testing.assert_array_equal(got_scale, scale)
        np.testing.assert_array_equal(got_zp, zp)
        assert found[name].spec == spec
    assert Encodings.from_meta(found.to_meta()) == found
    ragged = QuantSpec("int4", "block", axis=0, block_size=24)  # 64 rows: blocks of 24, 24 and 16
    scale, zp = numerics.params_for(W, ragged)
    encoding = Encoding.from_params("w", scale, zp, ragged)
    assert encoding.params(W.shape)[0].shape == (3, 32)
    assert encoding.params((72, 32))[0].shape == (3, 32)  # 72 rows take 3 blocks as well
    with pytest.raises(EncodingError, match="96 block scales do not fit shape \\[73, 32\\]"):
        encoding.params((73, 32))  # 4 blocks


def test_from_qdq_model_extracts_weights_and_activations():
    spec_w = QuantSpec("int8", "channel", axis=1)
    scale_w, zp_w = numerics.params_for(W, spec_w)
    inits = [numpy_helper.from_array(numerics.quantize(W, scale_w, zp_w, spec_w), "w.q"),
             numpy_helper.from_array(scale_w, "w.s"), numpy_helper.from_array(zp_w.astype(np.int8), "w.z"),
             numpy_helper.from_array(np.float32(0.05), "x.s"), numpy_helper.from_array(np.uint8(120), "x.z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x.s", "x.z"], ["x.q"], name="q"),
             helper.make_node("DequantizeLinear", ["x.q", "x.s", "x.z"], ["x.dq"], name="dq"),
             helper.make_node("DequantizeLinear", ["w.q", "w.s", "w.z"], ["w"], name="dqw", axis=1),
             helper.make_node("MatMul", ["x.dq", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])], inits)
    model = Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    found = Encodings.from_qdq_model(model)
    assert list(found.activations) == ["x"] and list(found.params) == ["w"]
    assert found["x"].offset.tolist() == [-120] and not found["x"].is_symmetric
    assert found["w"] == Encoding.from_params("w", scale_w, zp_w, spec_w)


def test_errors_name_the_entry(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": "1.0.0", "activation_encodings": [
        {"name": "x", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False, "scale": [-1.0], "offset": [0]}],
        "param_encodings": []}))
    with pytest.raises(EncodingError, match=r"bad.json, activation_encodings, entry 'x': .*positive"):
        Encodings.read(bad)
    bad.write_text(json.dumps({"version": "0.6.1", "activation_encodings": {}, "param_encodings": {
        "w": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "scale": 0.1}]}}))
    with pytest.raises(EncodingError, match=r"param_encodings, entry 'w': missing field 'offset'|entry 'w'"):
        Encodings.read(bad)
    bad.write_text("{not json")
    with pytest.raises(EncodingError, match="not valid JSON"):
        Encodings.read(bad)
    with pytest.raises(EncodingError, match="no such encodings file"):
        Encodings.read(tmp_path / "missing.json")
    with pytest.raises(EncodingError, match="PER_BLOCK cannot be written as 0.6.1"):
        _encodings().write(tmp_path / "old.json", "0.6.1")
    with pytest.raises(EncodingError, match="version must be one of"):
        _encodings().to_json("2.0")
    with pytest.raises(EncodingError, match="encoding 'z': offsets must lie"):
        Encoding("z", 8, scale=[0.1], offset=[5])
