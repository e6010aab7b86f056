"""quantize: QDQ layout and op counts, W8A8/W8A16/W4 fidelity, mixed precision, SmoothQuant
equivalence, masks, int32 bias, errors; SmolLM2 and MiniLM for real."""

import json
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.linear_sites import linear_sites
from graphopt.errors import GraphoptError, OptionError, UnsupportedGraphError
from graphopt.evaluation import metrics
from graphopt.frontends.corpora import lm_windows
from graphopt.ir import Model
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext
from graphopt.quant.encodings import Encodings

Quantize = get_pass("quantize")


def ops(model: Model) -> Counter:
    return Counter(n.op for n in model.graph.nodes)


@pytest.fixture(scope="module")
def tiny_calib():
    return PassContext(calib=[{"input_ids": w} for w in lm_windows(None, "calib", 4, 64)], progress=False)


@pytest.fixture(scope="module")
def tiny_eval(tiny_onnx):
    windows = lm_windows(None, "eval", 2, 64)
    run = tiny_onnx.runner()
    return windows, [run({"input_ids": w})[0] for w in windows]


def sqnr(model: Model, tiny_eval) -> float:
    windows, reference = tiny_eval
    run = model.runner()
    return float(np.mean([metrics.sqnr_db(r, run({"input_ids": w})[0]) for w, r in zip(windows, reference)]))


def test_w8a8_layout_and_fidelity(tiny_onnx, tiny_calib, tiny_eval):
    model = tiny_onnx.copy()
    result = Quantize().run(model, tiny_calib)
    assert result.changed
    counts = ops(result.model)
    # 2 layers x (qkv in, o in, gate/up in, down in) + lm_head in = 9 points; 14 linears + the tied table
    assert counts["QuantizeLinear"] == 9 and counts["DequantizeLinear"] == 9 + 15
    assert result.stats["weights"] == 15 and result.stats["activations"] == 9
    params = result.model.parameters()
    assert params["lm_head.weight.T_quantized"][1] == "uint8"
    assert "lm_head.weight.T" not in params  # the float table is gone: Gather and lm_head read its DQ
    assert result.model.num_bytes() < 0.3 * tiny_onnx.num_bytes()
    encodings = Encodings.from_meta(result.model.meta.encodings)
    assert len(encodings.activations) == 9 and len(encodings.params) == 15
    assert encodings == Encodings.from_qdq_model(result.model)
    assert sqnr(result.model, tiny_eval) > 20.0
    assert "lm_head.weight.T" in tiny_onnx.parameters()  # the input model is untouched


def test_w8a16_and_w4_block(tiny_onnx, tiny_calib, tiny_eval):
    wide = Quantize(activation_bits=16).run(tiny_onnx.copy(), tiny_calib).model
    assert sqnr(wide, tiny_eval) > 35.0
    assert all(e["bw"] == 16 for e in wide.meta.encodings.values() if e["kind"] == "activation")
    w4 = Quantize(weight_bits=4, weight_granularity="block", weight_block_size=16, activation_bits=0,
                  weight_range="mse", embedding_bits=8, weight_symmetric=True).run(tiny_onnx.copy(), tiny_calib).model
    assert ops(w4)["QuantizeLinear"] == 0
    params = w4.parameters()
    assert params["model.layers.0.mlp.down_proj.weight_quantized"][1] == "int4"
    assert params["lm_head.weight.T_quantized"][1] == "int8"
    dq = next(n for n in w4.graph.nodes if n.outputs[0].name == "model.layers.0.mlp.down_proj.weight")
    assert dq.attrs == {"axis": 0, "block_size": 16}
    assert sqnr(w4, tiny_eval) > 12.0


def test_gptq_beats_round_to_nearest_and_solves_shared_inputs_jointly(tiny_onnx, tiny_calib, tiny_eval):
    """W4 block GPTQ: closer to float than RTN on held-out windows; q/k/v (one input) are solved
    side by side, each keeping its own per-block grid; the tied table stays RTN."""
    options = dict(weight_bits=4, weight_granularity="block", weight_block_size=16, weight_symmetric=True,
                   activation_bits=0, embedding_bits=8)
    rtn = Quantize(**options).run(tiny_onnx.copy(), tiny_calib).model
    gptq = Quantize(weight_rounding="gptq", **options).run(tiny_onnx.copy(), tiny_calib).model
    assert sqnr(gptq, tiny_eval) > sqnr(rtn, tiny_eval) + 1.0
    codes = {n.outputs[0].name: n.inputs[0].values for n in gptq.graph.nodes if n.op == "DequantizeLinear"}
    rtn_codes = {n.outputs[0].name: n.inputs[0].values for n in rtn.graph.nodes if n.op == "DequantizeLinear"}
    assert codes["model.layers.0.self_attn.k_proj.weight"].shape == (64, 32)  # split back to its own shape
    np.testing.assert_array_equal(codes["lm_head.weight.T"], rtn_codes["lm_head.weight.T"])
    assert not np.array_equal(codes["model.layers.0.self_attn.q_proj.weight"],
                              rtn_codes["model.layers.0.self_attn.q_proj.weight"])


def test_nothing_to_do_leaves_model_untouched(tiny_onnx, tiny_calib):
    quantized = Quantize().run(tiny_onnx.copy(), tiny_calib).model
    before = quantized.to_onnx().SerializeToString()
    again = Quantize().run(quantized, tiny_calib)
    assert not again.changed and again.model.to_onnx().SerializeToString() == before


def test_mixed_precision_from_list_budget_and_sensitivity(tiny_onnx, tiny_calib, tmp_path):
    explicit = "model.layers.1.mlp.down_proj.weight"
    points = [e for e in Quantize().run(tiny_onnx.copy(), tiny_calib).model.meta.encodings.values() if e["kind"] == "activation"]
    names = [p["name"] for p in points]
    ranking = {"ranking": [{"point": names[3], "kind": "activation", "drop": 0.5},
                           {"point": explicit, "kind": "weight", "drop": 0.4},
                           {"point": names[5], "kind": "activation", "drop": 0.1}]}
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(ranking))
    model = Quantize(int16_points=[names[0]], int16_budget=0.3, sensitivity=str(path)).run(tiny_onnx.copy(), tiny_calib).model
    wide = {n for n, e in model.meta.encodings.items() if e["kind"] == "activation" and e["bw"] == 16}
    assert wide == {names[0], names[3]}  # floor(0.3 x 9) = 2: the explicit point, then the ranking's first
    proxy = Quantize(int16_budget=0.25).run(tiny_onnx.copy(), tiny_calib)
    assert proxy.stats["int16_points"] == 2
    assert proxy.stats["int16_share"] == {"activations": [2, 9], "points": [2, 24]}
    # over every point (9 activations + 15 weights), less the one 16-bit weight: floor(0.25 x 24) - 1 = 5
    by_points = Quantize(int16_budget=0.25, int16_budget_over="points", int16_weights=[explicit]).run(
        tiny_onnx.copy(), tiny_calib)
    assert by_points.stats["int16_share"] == {"activations": [5, 9], "points": [6, 24]}


def test_ranking_rows_match_by_the_weights_they_feed(tiny_onnx, tiny_calib, tmp_path):
    """A ranking from another export names activations differently; its rows still find their
    points through the weights each feeds (parameter names are stable)."""
    site = next(s for s in linear_sites(tiny_onnx) if "layers.1.mlp.down_proj" in s.weight)
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps({"ranking": [{"point": "renamed_mul_1", "kind": "activation", "drop": 0.5,
                                             "feeds": [site.weight]}]}))
    model = Quantize(int16_budget=0.12, sensitivity=str(path)).run(tiny_onnx.copy(), tiny_calib).model
    wide = {n for n, e in model.meta.encodings.items() if e["kind"] == "activation" and e["bw"] == 16}
    assert wide == {site.activation}


def test_int16_weights(tiny_onnx, tiny_calib, tiny_eval):
    """A weight named in int16_weights gets uint16 codes per channel; the rest stay 8-bit."""
    wide = "model.layers.0.mlp.down_proj.weight"
    model = Quantize(int16_weights=[wide]).run(tiny_onnx.copy(), tiny_calib).model
    params = {n: e for n, e in model.meta.encodings.items() if e["kind"] == "param"}
    assert params[wide]["bw"] == 16 and {e["bw"] for n, e in params.items() if n != wide} == {8}
    codes = {n.outputs[0].name: n.inputs[0].values.dtype for n in model.graph.nodes if n.op == "DequantizeLinear"
             and isinstance(n.inputs[0], gs.Constant)}
    assert codes[wide] == np.uint16
    assert sqnr(model, tiny_eval) > 20


def test_smoothquant_is_exact_before_rounding(tiny_onnx, tiny_calib, tiny_eval):
    """With 16-bit weights and activations the rounding is negligible: the smoothed model must
    compute what the float one does (a wrong fold would show as a large error)."""
    plain = Quantize(weight_bits=16, activation_bits=16).run(tiny_onnx.copy(), tiny_calib)
    smoothed = Quantize(weight_bits=16, activation_bits=16, smoothquant_alpha=0.5).run(tiny_onnx.copy(), tiny_calib)
    assert smoothed.stats["smoothed"] >= 2
    assert sqnr(smoothed.model, tiny_eval) > 40.0 and sqnr(plain.model, tiny_eval) > 40.0


def test_smoothquant_weights_limit_smoothing_to_the_named_linears(tiny_onnx, tiny_calib, tiny_eval):
    everywhere = Quantize(weight_bits=16, activation_bits=16, smoothquant_alpha=0.5).run(tiny_onnx.copy(), tiny_calib)
    down_only = Quantize(weight_bits=16, activation_bits=16, smoothquant_alpha=0.5,
                         smoothquant_weights=("*layers.0.mlp.down_proj*",)).run(tiny_onnx.copy(), tiny_calib)
    assert down_only.stats["smoothed"] == 1 < everywhere.stats["smoothed"]
    original = tiny_onnx.graph.tensors()
    # only the named weight took the factors; the others are as they were (up to 16-bit rounding)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        dq = next(n for n in down_only.model.graph.nodes if n.op == "DequantizeLinear" and n.inputs[0].name.startswith(name))
        codes = np.asarray(dq.inputs[0].values, np.float64)
        scale, zero = np.asarray(dq.inputs[1].values, np.float64), np.asarray(dq.inputs[2].values, np.float64)
        values = (codes - zero[None, :]) * scale[None, :]
        moved = not np.allclose(values, original[name].values, atol=1e-3)
        assert moved == ("layers.0" in name), name
    assert sqnr(down_only.model, tiny_eval) > 40.0


def test_smoothed_ranges_from_one_calibration_run_match_a_second_run(tiny_onnx, tiny_calib, monkeypatch):
    """MSE ranges and GPTQ Hessians of smoothed points come from recorded values divided by the
    migration factors; running the smoothed model again (the fallback past RECORDING_LIMIT)
    must give the same encodings."""
    import graphopt.passes.quantize as quantize_module

    options = dict(smoothquant_alpha=0.5, observer="mse", weight_rounding="gptq")
    one_run = Encodings.from_meta(Quantize(**options).run(tiny_onnx.copy(), tiny_calib).model.meta.encodings)
    monkeypatch.setattr(quantize_module, "RECORDING_LIMIT", 0)
    two_runs = Encodings.from_meta(Quantize(**options).run(tiny_onnx.copy(), tiny_calib).model.meta.encodings)
    assert set(one_run.activations) == set(two_runs.activations) and len(one_run.activations) == 9
    for name, encoding in one_run.activations.items():
        np.testing.assert_allclose(encoding.scale, two_runs.activations[name].scale, rtol=1e-3, err_msg=name)
    for name, encoding in one_run.params.items():
        np.testing.assert_allclose(encoding.scale, two_runs.params[name].scale, rtol=1e-3, err_msg=name)


def test_masked_zeros_stay_zero(tiny_onnx, tiny_calib):
    model = tiny_onnx.copy()
    weight = model.graph.tensors()["model.layers.0.mlp.up_proj.weight"]
    values = np.array(weight.values)
    values[np.abs(values) < np.median(np.abs(values))] = 0.0
    weight.values = values
    model.meta.masks[weight.name] = {"pattern": "unstructured", "ratio": 0.5}
    out = Quantize(weight_bits=4, weight_granularity="block", weight_block_size=16).run(model, tiny_calib).model
    tensors = out.graph.tensors()
    codes = tensors["model.layers.0.mlp.up_proj.weight_quantized"].values.astype(np.int32)
    zero_point = np.repeat(tensors["model.layers.0.mlp.up_proj.weight_zero_point"].values.astype(np.int32), 16, axis=0)
    assert np.all(codes[values == 0] == zero_point[values == 0])  # asymmetric uint4: zero sits at the zero point


def _gemm_model() -> Model:
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_int32_bias():
    """Exact QDQ semantics (ORT with graph optimizations off); ORT 1.32's fused kernels get the
    int32 bias wrong, which is why quantize_bias is off by default."""
    import onnxruntime as ort

    model = _gemm_model()
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    reference = model.run({"x": x})[0]
    out = Quantize(quantize_bias=True).run(model, PassContext(calib=[{"x": x}], progress=False)).model
    assert out.parameters()["b_quantized"][1] == "int32"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(out.to_onnx().SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], reference, atol=0.05)
    plain = Quantize().run(_gemm_model(), PassContext(calib=[{"x": x}], progress=False)).model
    assert "b" in plain.parameters()  # float bias by default
    np.testing.assert_allclose(plain.run({"x": x})[0], reference, atol=0.05)


def test_errors(tiny_onnx):
    with pytest.raises(OptionError, match="'weight_bits' must be 4, 8 or 16"):
        Quantize(weight_bits=3)
    with pytest.raises(OptionError, match="int16_budget"):
        Quantize(int16_budget=1.5)
    with pytest.raises(OptionError, match="weight_block_size"):
        Quantize(weight_granularity="block", weight_block_size=48)
    with pytest.raises(OptionError, match="sensitivity"):
        Quantize(sensitivity="/nonexistent/sens.json")
    with pytest.raises(OptionError, match="needs calibration data"):
        Quantize().run(tiny_onnx.copy(), PassContext(calib=None, progress=False))
    with pytest.raises(OptionError, match="int16_points.*'nope'"):
        Quantize(int16_points=["nope"]).run(tiny_onnx.copy(), PassContext(calib=None, progress=False))
    with pytest.raises(OptionError, match="int16_weights.*'model.norm.weight'"):
        Quantize(int16_weights=["model.norm.weight"], activation_bits=0).run(tiny_onnx.copy(), PassContext(progress=False))
    with pytest.raises(UnsupportedGraphError, match="not a multiple of weight_block_size 128"):
        Quantize(weight_bits=4, weight_granularity="block", weight_block_size=128, activation_bits=0).run(
            tiny_onnx.copy(), PassContext(progress=False))
    with pytest.raises(GraphoptError, match="FX"):
        Quantize().run(Model(fx=object(), inputs=[], outputs=[]), PassContext())


@pytest.mark.real
def test_smollm2_w8a8_int16_budget(smollm2_onnx, smollm2_calib, smollm2_eval):
    """The real model: 121 points, 15 % at 16 bits by the SQNR proxy; the file is a quarter."""
    from graphopt.evaluation.lm import evaluate_causal_lm

    reference_row, reference = evaluate_causal_lm(smollm2_onnx, smollm2_eval)
    result = Quantize(int16_budget=0.15, smoothquant_alpha=0.5).run(
        smollm2_onnx.copy(), PassContext(calib=smollm2_calib, progress=False))
    assert result.stats["smoothed"] == 90  # 30 x (q/k/v input, gate/up input, down_proj input)
    assert result.stats["activations"] == 121 and result.stats["weights"] == 211
    assert result.stats["int16_points"] == 18
    assert result.stats["int16_share"] == {"activations": [18, 121], "points": [18, 332]}
    assert result.model.num_bytes() < 0.27 * smollm2_onnx.num_bytes()
    row, _ = evaluate_causal_lm(result.model, smollm2_eval, reference)
    assert row["overlap@1"] > 0.8 and row["ppl"] < 1.15 * reference_row["ppl"]
