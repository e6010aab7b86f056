"""Sensitivity: the points found, one probe run per point matching a directly quantized model, reports."""

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import cli
from graphopt.analysis import sensitivity
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.evaluation.metrics import sqnr_db
from graphopt.ir import Model
from graphopt.quant import numerics


def _two_layer(rng) -> tuple[Model, np.ndarray, np.ndarray]:
    """y = relu(x @ W1) @ W2, with activations that make quantization visible."""
    w1 = rng.normal(size=(16, 32)).astype(np.float32)
    w2 = rng.normal(size=(32, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return Model.from_onnx(proto, name="two"), w1, w2


def test_points_of_the_tiny_llama(tiny_onnx):
    points = sensitivity.quantization_points(tiny_onnx)
    weights = [p.name for p in points if p.kind == "weight"]
    linear_inputs = [p for p in points if p.kind == "activation" and p.feeds]
    attention = [p for p in points if p.kind == "activation" and not p.feeds]
    assert len(weights) == 15 and weights.count("lm_head.weight.T") == 1  # tied table: one point
    # per layer: attention input (q/k/v share it), o_proj, gate/up (shared), down_proj; plus lm_head
    assert len(linear_inputs) == 9
    assert sorted(len(p.feeds) for p in linear_inputs) == [1] * 5 + [2, 2, 3, 3]
    assert len(attention) == 8  # two activation-activation MatMuls per layer, two inputs each
    assert all(p.axis == 1 for p in points if p.kind == "weight")


def test_each_point_measures_exactly_its_own_quantization():
    """The switchable probe equals a model where only that tensor is fake-quantized (numpy)."""
    rng = np.random.default_rng(0)
    model, w1, w2 = _two_layer(rng)
    calib = [{"x": rng.normal(size=(64, 16)).astype(np.float32)} for _ in range(2)]
    measure = [{"x": rng.normal(size=(32, 16)).astype(np.float32)}]
    before = model.to_onnx().SerializeToString()
    report = sensitivity.analyze_sensitivity(model, calib, measure, progress=False)
    assert model.to_onnx().SerializeToString() == before  # input untouched
    rows = {r["point"]: r for r in report.ranking}
    assert set(rows) == {"x", "r", "W1", "W2"}
    x = measure[0]["x"]
    reference = np.maximum(x @ w1, 0) @ w2
    act = sensitivity.DEFAULT_ACTIVATION_SPEC
    lo = min(float(c["x"].min()) for c in calib)
    hi = max(float(c["x"].max()) for c in calib)
    scale, zp = numerics.scale_zero_point(np.float32(lo), np.float32(hi), act)
    expected = {
        "x": np.maximum(numerics.fake_quant(x, act, scale, zp) @ w1, 0) @ w2,
        "W1": np.maximum(x @ numerics.fake_quant(w1, sensitivity.DEFAULT_WEIGHT_SPEC), 0) @ w2,
        "W2": np.maximum(x @ w1, 0) @ numerics.fake_quant(w2, sensitivity.DEFAULT_WEIGHT_SPEC),
    }
    for name, out in expected.items():
        assert rows[name]["sqnr_db"] == pytest.approx(sqnr_db(reference, out), abs=0.05), name
    assert all(np.isfinite(r["sqnr_db"]) and r["kl"] > 0 for r in report.ranking)
    drops = [r["drop"] for r in report.ranking]
    assert drops == sorted(drops, reverse=True)


def test_report_json_markdown_plot_and_cli(tiny_onnx, tmp_path, capsys):
    rng = np.random.default_rng(1)
    calib = [{"input_ids": rng.integers(0, 256, size=(1, 24)).astype(np.int64)} for _ in range(2)]
    report = sensitivity.analyze_sensitivity(tiny_onnx, calib, metric="overlap", kinds=("weight",), progress=False)
    data = json.loads(report.save_json(tmp_path / "s.json").read_text())
    assert data["model"] == tiny_onnx.name and data["metric"] == "overlap"
    assert len(data["ranking"]) == 15 and {"point", "kind", "drop", "sqnr_db"} <= set(data["ranking"][0])
    assert all(r["drop"] == pytest.approx(1 - r["overlap@1"]) for r in data["ranking"])
    assert report.markdown(5).count("\n") == 7
    png = report.plot(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "cli.json"
    assert cli.main(["sensitivity", "sample:tiny-llama", "--windows", "1", "--calib-windows", "1",
                     "--length", "16", "--kinds", "activation", "--top", "3", "--json", str(out)]) == 0
    assert capsys.readouterr().out.count("| activation |") == 3
    assert len(json.loads(out.read_text())["ranking"]) == 17
    # ranked on the model a recipe quantizes: rotate adds the final norm's MatMul, one more point
    assert cli.main(["sensitivity", "sample:tiny-llama", "--prepare", "cleanup, rotate", "--windows", "1",
                     "--calib-windows", "1", "--length", "16", "--kinds", "activation", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["ranking"]) == 18


def test_errors_name_the_problem(tiny_fx, tiny_onnx):
    feeds = tiny_onnx.sample_inputs
    with pytest.raises(OptionError, match="metric"):
        sensitivity.analyze_sensitivity(tiny_onnx, feeds, metric="mse", progress=False)
    with pytest.raises(OptionError, match="calibration"):
        sensitivity.analyze_sensitivity(tiny_onnx, [], progress=False)
    with pytest.raises(OptionError, match="'nope' is not a quantization point"):
        sensitivity.analyze_sensitivity(tiny_onnx, feeds, points=["nope"], progress=False)
    with pytest.raises(UnsupportedGraphError, match="ONNX"):
        sensitivity.analyze_sensitivity(tiny_fx, feeds, progress=False)
    assert cli.main(["sensitivity", "sample:tiny-llama", "--windows", "0"]) == 2
    assert cli.main(["sensitivity", "sample:tiny-llama", "--prepare", "nope"]) == 2



@pytest.mark.parametrize("flag, value", [("--top", "-5"), ("--top", "0"), ("--windows", "0"), ("--length", "1")])
def test_cli_counts_out_of_range_are_one_line_naming_the_option(flag, value, capsys):
    """`--top -5` was accepted (and printed no rows); every count is checked before the model loads."""
    assert cli.main(["sensitivity", "sample:tiny-llama", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "loading" not in err

@pytest.mark.real
def test_smollm2_down_proj_input_outranks_attention_input(smollm2_onnx, smollm2_calib):
    """The issue's finding, on one layer: int8 per-tensor hurts mlp.down_proj's input most."""
    points = {p.feeds[0]: p.name for p in sensitivity.quantization_points(smollm2_onnx) if p.feeds}
    chosen = [points[f"model.layers.{i}.{w}.weight"] for i in (3,) for w in
              ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]
    report = sensitivity.analyze_sensitivity(smollm2_onnx, smollm2_calib[:2], smollm2_calib[2:3],
                                             points=chosen, progress=False)
    assert report.ranking[0]["point"] == points["model.layers.3.mlp.down_proj.weight"], report.markdown()
    assert report.ranking[0]["kl"] > 18 * report.ranking[-1]["kl"]  # 21x measured
