"""fake_quantize (FX): where quantizers go, that they compute numerics' fake-quant, and when the pass must not fire.

Fidelity bounds are the values measured on the tiny Llama minus a small margin, each beside a
broken variant that must fail the same check: W8A8 38.2 dB, W4 weights alone 26.0 dB, GPTQ
+2.3 dB over round-to-nearest."""

import functools

import numpy as np
import pytest
import torch

import graphopt
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.evaluation.metrics import sqnr_db
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext
from graphopt.quant import numerics
from graphopt.quant.observers import MinMaxObserver
from graphopt.quant.spec import QuantSpec
from graphopt.training import fake_quant

FakeQuantize = get_pass("fake_quantize")



@pytest.fixture(scope="module")
def tiny_calib():
    from graphopt.frontends.corpora import lm_windows

    return [{"input_ids": w} for w in lm_windows(None, "calib", 2, 32)]


@pytest.fixture(scope="module")
def quantized(tiny_fx, tiny_calib):
    model = tiny_fx.copy()
    result = FakeQuantize().run(model, PassContext(calib=tiny_calib, progress=False))
    return model, result


def test_quantizers_at_every_linear_weight_and_input(tiny_fx, quantized, tiny_calib, scale_times_four):
    model, result = quantized
    assert result.changed and result.stats == {"weight_quantizers": 15, "activation_quantizers": 9, "int16_activations": 0,
                                             "int16_share": {"activations": [0, 9], "points": [0, 24]},
                                             "gptq_weights": 0}
    modules = fake_quant.fake_quant_modules(model)
    weights = sorted(m.name for m in modules.values() if m.kind == "weight")
    assert "lm_head.weight" in weights and len(weights) == 15
    # the tied table's one quantizer feeds both the embedding lookup and the lm_head linear
    tied = next(n for n in model.fx.graph.nodes if n.target in modules and modules[n.target].name == "lm_head.weight")
    assert sorted(str(u.target) for u in tied.users) == ["aten.embedding.default", "aten.linear.default"]
    # residual adds keep reading the float tensor: only linears were rewired
    for node in model.fx.graph.nodes:
        if node.target in modules and modules[node.target].kind == "activation":
            assert {str(u.target) for u in node.users} == {"aten.linear.default"}
    reference = tiny_fx.run(tiny_calib[1])[0]
    out = model.run(tiny_calib[1])[0]
    assert 37.0 < sqnr_db(reference, out) < 60.0  # W8A8 moves the output, but not far (measured 38.2)
    fake_quant.set_fake_quant(model, False)
    try:
        np.testing.assert_array_equal(model.run(tiny_calib[1])[0], reference)
    finally:
        fake_quant.set_fake_quant(model, True)
    assert model.meta.extra["fake_quant"][0].keys() >= {"module", "kind", "name", "feeds"}
    scale_times_four(MinMaxObserver, "params")  # activation scales x4
    broken = tiny_fx.copy()
    FakeQuantize().run(broken, PassContext(calib=tiny_calib, progress=False))
    assert not 37.0 < sqnr_db(reference, broken.run(tiny_calib[1])[0]) < 60.0


def test_quantizer_computes_numerics_fake_quant_exactly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 40)).astype(np.float32) * 3
    for spec, channels in ((QuantSpec("uint8", "tensor", symmetric=False), 1),
                           (QuantSpec("int4", "channel", axis=0, symmetric=True), 6)):
        module = fake_quant.FakeQuant(spec, "weight", "w", channels=channels)
        module.observing = True
        module(torch.from_numpy(x))
        module.observing = False
        module.init_from_range()
        scale, zero_point = module.params()
        expected = numerics.fake_quant(x, spec, scale, zero_point)
        np.testing.assert_array_equal(module(torch.from_numpy(x)).detach().numpy(), expected)
        # straight-through: gradient 1 inside the grid, and the scale receives a gradient
        t = torch.from_numpy(x).requires_grad_(True)
        module(t).sum().backward()
        assert module.log_scale.grad is not None and torch.all(t.grad[(t.grad != 0)] == 1)


def test_nothing_to_do_leaves_the_model_alone(quantized, tiny_calib):
    model, _ = quantized
    code = model.fx.code
    again = FakeQuantize().run(model, PassContext(calib=tiny_calib, progress=False))
    assert not again.changed and model.fx.code == code
    mlp = graphopt.load(torch.nn.Sequential(torch.nn.ReLU()), {"x": np.ones((2, 3), np.float32)}, log=lambda *_: None)
    before = mlp.fx.code
    result = FakeQuantize().run(mlp, PassContext(calib=None, progress=False))
    assert not result.changed and mlp.fx.code == before


def test_bad_options_and_forms_are_refused(tiny_fx, tiny_onnx):
    with pytest.raises(OptionError, match="weight_bits"):
        FakeQuantize(weight_bits=3)
    with pytest.raises(OptionError, match="activation_bits"):
        FakeQuantize(activation_bits=4)
    with pytest.raises(OptionError, match="weight_granularity"):
        FakeQuantize.from_options({"weight_granularity": "block"})
    with pytest.raises(OptionError, match="calibration"):
        FakeQuantize().run(tiny_fx.copy(), PassContext(calib=None, progress=False))
    with pytest.raises(UnsupportedGraphError, match="FX"):
        FakeQuantize().run(tiny_onnx, PassContext(progress=False))


def test_weights_only_need_no_calibration(tiny_fx, tiny_calib, scale_times_four):
    model = tiny_fx.copy()
    result = FakeQuantize(activation_bits=0, weight_bits=4).run(model, PassContext(calib=None, progress=False))
    assert result.stats == {"weight_quantizers": 15, "activation_quantizers": 0, "int16_activations": 0,
                            "int16_share": {"activations": [0, 0], "points": [0, 15]}, "gptq_weights": 0}
    reference = tiny_fx.run(tiny_calib[0])[0]
    assert 25.0 < sqnr_db(reference, model.run(tiny_calib[0])[0]) < 40.0  # measured 26.0
    scale_times_four(numerics, "scale_zero_point")  # weight scales x4
    broken = tiny_fx.copy()
    FakeQuantize(activation_bits=0, weight_bits=4).run(broken, PassContext(calib=None, progress=False))
    assert not 25.0 < sqnr_db(reference, broken.run(tiny_calib[0])[0]) < 40.0


def test_sensitive_inputs_get_16_bits(tiny_fx, tiny_calib, tmp_path):
    """int16_inputs names weights directly; int16_budget takes a sensitivity ranking's first
    activation points (a tied table's ONNX name NAME.T matches its FX parameter)."""
    ranking = {"ranking": [{"point": "a", "kind": "activation", "drop": 0.5, "feeds": ["lm_head.weight.T"]},
                           {"point": "w", "kind": "weight", "drop": 0.4, "feeds": []},
                           {"point": "b", "kind": "activation", "drop": 0.3,
                            "feeds": ["model.layers.1.mlp.down_proj.weight"]}]}
    path = tmp_path / "sensitivity.json"
    path.write_text(__import__("json").dumps(ranking))
    model = tiny_fx.copy()
    result = FakeQuantize(int16_inputs=("model.layers.0.mlp.down_proj.weight",), int16_budget=0.3,
                          sensitivity=str(path)).run(model, PassContext(calib=tiny_calib, progress=False))
    wide = sorted(m.name for m in fake_quant.fake_quant_modules(model).values() if m.spec.dtype == "uint16")
    assert result.stats["int16_activations"] == 2  # floor(0.3 * 9 points) = 2: the named one, then the top row
    assert wide == ["lm_head.weight", "model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(OptionError, match="int16_inputs.*'nope'"):
        FakeQuantize(int16_inputs=("nope",)).run(tiny_fx.copy(), PassContext(calib=tiny_calib, progress=False))
    # without a ranking, the calibration statistics rank the points (the quantize pass's SQNR proxy)
    proxy = FakeQuantize(int16_budget=0.25).run(tiny_fx.copy(), PassContext(calib=tiny_calib, progress=False))
    assert proxy.stats["int16_share"] == {"activations": [2, 9], "points": [2, 24]}


def test_int16_inputs_by_pattern_and_budget_over_points(tiny_fx, tiny_calib, tmp_path):
    """int16_inputs takes globs; a budget over "points" counts the 15 weights too (24 points) and
    charges the 16-bit weights to it, so 0.3 buys floor(0.3 x 24) - 1 = 6 activation points."""
    model = tiny_fx.copy()
    result = FakeQuantize(int16_inputs=("*.mlp.down_proj.weight",)).run(model, PassContext(calib=tiny_calib, progress=False))
    wide = sorted(m.name for m in fake_quant.fake_quant_modules(model).values() if m.spec.dtype == "uint16")
    assert wide == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert result.stats["int16_share"] == {"activations": [2, 9], "points": [2, 24]}
    with pytest.raises(OptionError, match="int16_inputs.*'\\*.nope'"):
        FakeQuantize(int16_inputs=("*.nope",)).run(tiny_fx.copy(), PassContext(calib=tiny_calib, progress=False))

    points = fake_quant.activation_points(tiny_fx)
    ranking = {"ranking": [{"point": f"p{i}", "kind": "activation", "drop": 1.0 - i / 10, "feeds": [feeds[0]]}
                           for i, feeds in enumerate(points)]}
    path = tmp_path / "sensitivity.json"
    path.write_text(__import__("json").dumps(ranking))
    common = dict(int16_budget=0.3, sensitivity=str(path), int16_weights=("model.layers.0.mlp.up_proj.weight",))
    by_activations = FakeQuantize(**common).run(tiny_fx.copy(), PassContext(calib=tiny_calib, progress=False))
    assert by_activations.stats["int16_share"] == {"activations": [2, 9], "points": [3, 24]}  # floor(0.3 x 9)
    by_points = FakeQuantize(int16_budget_over="points", **common).run(
        tiny_fx.copy(), PassContext(calib=tiny_calib, progress=False))
    assert by_points.stats["int16_share"] == {"activations": [6, 9], "points": [7, 24]}
    with pytest.raises(OptionError, match="int16_budget_over"):
        FakeQuantize(int16_budget_over="weights")


def test_int16_weights_and_rotate_before_not_after(tiny_fx, quantized, tiny_calib):
    """int16_weights gives a weight quantizer 16 bits (rotate's gain matrix); rotate refuses a
    model that already holds quantizers, since the learned scales would no longer fit."""
    wide = "model.layers.0.mlp.down_proj.weight"
    model = tiny_fx.copy()
    FakeQuantize(int16_weights=[wide]).run(model, PassContext(calib=tiny_calib, progress=False))
    dtypes = {m.name: m.spec.dtype for m in fake_quant.fake_quant_modules(model).values() if m.kind == "weight"}
    assert dtypes[wide] == "uint16"  # asymmetric weights by default, as the quantize pass's
    assert {d for n, d in dtypes.items() if n != wide} == {"uint8"}
    with pytest.raises(OptionError, match="int16_weights.*'nope'"):
        FakeQuantize(int16_weights=["nope"]).run(tiny_fx.copy(), PassContext(calib=tiny_calib, progress=False))
    result = get_pass("rotate")().run(quantized[0].copy(), PassContext())
    assert not result.changed and "fake quantizers" in result.stats["reason"]


def test_mse_observer_starts_activations_where_the_quantize_pass_would(tiny_fx, tiny_calib):
    """observer="mse" clips activation ranges as the quantize pass's MSE observer does; weights keep min-max."""
    from graphopt.quant.observers import make_observer

    plain, clipped = tiny_fx.copy(), tiny_fx.copy()
    FakeQuantize().run(plain, PassContext(calib=tiny_calib, progress=False))
    FakeQuantize(observer="mse").run(clipped, PassContext(calib=tiny_calib, progress=False))
    a, b = fake_quant.fake_quant_modules(plain), fake_quant.fake_quant_modules(clipped)
    acts = [n for n, m in a.items() if m.kind == "activation"]
    weights = [n for n, m in a.items() if m.kind == "weight"]
    assert all(torch.equal(a[n].log_scale, b[n].log_scale) for n in weights)
    assert all(b[n].log_scale <= a[n].log_scale + 1e-6 for n in acts)
    assert any(b[n].log_scale < a[n].log_scale - 1e-3 for n in acts)
    # the first activation quantizer's scale is exactly the observer's on the same data
    first = b[acts[0]]
    observer = make_observer("mse")
    first.observer = observer
    for module in b.values():  # calibration sees the float model: every quantizer passes through
        module.observing = True
    for batch in tiny_calib:
        clipped.run(batch)
    for module in b.values():
        module.observing = False
    scale, _ = observer.params(first.spec)
    np.testing.assert_allclose(float(first.log_scale.detach().exp()), float(scale), rtol=1e-5)


def test_gptq_weights_sit_on_their_grid_and_beat_round_to_nearest(tiny_fx, monkeypatch):
    from graphopt.frontends.corpora import lm_windows

    calib = [{"input_ids": w} for w in lm_windows(None, "calib", 4, 32)]  # 128 tokens for 64-wide inputs
    held_out = {"input_ids": lm_windows(None, "eval", 1, 32)[0]}
    reference = tiny_fx.run(held_out)[0]
    quality, models = {}, {}
    for rounding in ("rtn", "gptq"):  # 4-bit weights: rounding matters; 16-bit inputs: it is all that does
        model = tiny_fx.copy()
        result = FakeQuantize(weight_bits=4, activation_bits=16, weight_rounding=rounding).run(
            model, PassContext(calib=calib, progress=False))
        models[rounding], quality[rounding] = model, sqnr_db(reference, model.run(held_out)[0])
    assert result.stats["gptq_weights"] == 14  # every linear weight but the tied embedding / lm_head table
    assert quality["gptq"] > quality["rtn"] + 1.8, quality  # measured: +2.3 dB
    param = lambda model, name: functools.reduce(getattr, name.split("."), model.fx).detach()  # noqa: E731
    for module in fake_quant.fake_quant_modules(models["gptq"]).values():
        if module.kind != "weight":
            continue
        weight = param(models["gptq"], module.name)
        if module.name == "lm_head.weight":  # tables keep round-to-nearest and their float values
            torch.testing.assert_close(weight, param(tiny_fx, module.name), rtol=0, atol=0)
            continue
        with torch.no_grad():  # on the grid: the quantizer gives the weight back
            torch.testing.assert_close(module(weight), weight, rtol=0, atol=1e-6)
    from graphopt.analysis.capture import InputHessian

    # broken variant: GPTQ blind to the calibration inputs (identity Hessians) loses the gain
    monkeypatch.setattr(InputHessian, "hessian", property(lambda self: np.eye(self.h.shape[0])))
    blind = tiny_fx.copy()
    FakeQuantize(weight_bits=4, activation_bits=16, weight_rounding="gptq").run(blind, PassContext(calib=calib, progress=False))
    assert not sqnr_db(reference, blind.run(held_out)[0]) > quality["rtn"] + 1.8


def test_gptq_needs_activation_quantizers(tiny_fx):
    with pytest.raises(OptionError, match="weight_rounding"):
        FakeQuantize(activation_bits=0, weight_rounding="gptq").run(tiny_fx.copy(), PassContext(progress=False))
