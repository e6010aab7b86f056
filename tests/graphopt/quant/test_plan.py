"""The quantization plan: one set of options and one choice of 16-bit points for quantize (ONNX) and
fake_quantize (FX); both passes choose the same points and make the same weight grids."""

import json

import numpy as np
import pytest

from graphopt.analysis.linear_sites import linear_sites
from graphopt.errors import GraphoptError, OptionError, UnsupportedGraphError
from graphopt.frontends.corpora import lm_windows
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext
from graphopt.quant.encodings import Encodings
from graphopt.quant.plan import QuantOptions, plan_int16, weight_key
from graphopt.training import fake_quant

# the tiny Llama's activation points as the ONNX form names their weights (a tied table is NAME.T)
POINTS = [("l0.q", "l0.k", "l0.v"), ("l0.o",), ("l0.gate", "l0.up"), ("l0.down",),
          ("l1.q", "l1.k", "l1.v"), ("l1.o",), ("l1.gate", "l1.up"), ("l1.down",), ("lm_head.weight.T",)]
WEIGHTS = {w for point in POINTS for w in point}


def _never():
    raise AssertionError("the proxy was asked although a ranking or the explicit points decide")


def _ranking(tmp_path, rows) -> str:
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps({"ranking": rows}))
    return str(path)


def test_explicit_inputs_then_the_ranking_up_to_the_budget(tmp_path):
    """int16_inputs globs pick their points whatever the budget; the ranking then fills it, rows
    matched by the weights they feed (the FX name of a tied table finds its ONNX `NAME.T`), weight
    rows and rows that feed nothing here (attention MatMul inputs) skipped."""
    path = _ranking(tmp_path, [
        {"point": "w", "kind": "weight", "drop": 0.9},
        {"point": "scores", "kind": "activation", "drop": 0.8, "feeds": []},
        {"point": "x", "kind": "activation", "drop": 0.7, "feeds": ["lm_head.weight"]},
        {"point": "y", "kind": "activation", "drop": 0.6, "feeds": ["l1.up"]},
        {"point": "z", "kind": "activation", "drop": 0.5, "feeds": ["l0.o"]},
    ])
    options = QuantOptions(int16_inputs=("*.down",), int16_budget=0.45, sensitivity=path)
    plan = plan_int16(options, POINTS, WEIGHTS, "tiny", _never)
    assert plan.wide == {3, 7, 8, 6}  # floor(0.45 x 9) = 4: two named, then the first two rows that feed here
    assert plan.share == {"activations": [4, 9], "points": [4, 9 + 15]}
    few = plan_int16(QuantOptions(int16_inputs=("*.down",), int16_budget=0.1, sensitivity=path), POINTS, WEIGHTS,
                     "tiny", _never)
    assert few.wide == {3, 7}  # the named points stay although the budget buys one


def test_proxy_ranks_lowest_sqnr_first_and_budget_over_points():
    sqnr = [30.0, 35.0, 20.0, 10.0, 31.0, 36.0, 21.0, 11.0, 25.0]
    plan = plan_int16(QuantOptions(int16_budget=0.34), POINTS, WEIGHTS, "tiny", lambda: sqnr)
    assert plan.wide == {3, 7, 2}  # floor(0.34 x 9) = 3 lowest estimates
    # over every point (9 + 15), less the two 16-bit weights the options name: floor(0.25 x 24) - 2 = 4
    wide_weights = QuantOptions(int16_budget=0.25, int16_budget_over="points", int16_weights=("l0.up", "re:^l1\\.o$"))
    plan = plan_int16(wide_weights, POINTS, WEIGHTS, "tiny", lambda: sqnr)
    assert plan.wide == {3, 7, 2, 6}
    assert plan.share == {"activations": [4, 9], "points": [6, 24]}
    every = plan_int16(QuantOptions(activation_bits=16), POINTS, WEIGHTS, "tiny", _never)
    assert every.wide == set(range(9))
    weights_only = plan_int16(QuantOptions(activation_bits=0, weight_bits=16, int16_budget=0.5), [], WEIGHTS, "tiny", _never)
    assert weights_only.wide == set() and weights_only.share == {"activations": [0, 0], "points": [15, 15]}


def test_plan_errors_name_the_option(tmp_path):
    with pytest.raises(OptionError, match="'int16_inputs'.*'nope.\\*'.*'tiny'"):
        plan_int16(QuantOptions(int16_inputs=("nope.*",)), POINTS, WEIGHTS, "tiny", _never)
    with pytest.raises(OptionError, match="'int16_weights'.*'l9.up'"):
        plan_int16(QuantOptions(int16_weights=("l9.up",)), POINTS, WEIGHTS, "tiny", _never)
    other = _ranking(tmp_path, [{"point": "a", "kind": "activation", "drop": 1.0, "feeds": ["encoder.dense"]}])
    with pytest.raises(OptionError, match="'sensitivity'.*feeds a quantized weight of 'tiny'"):
        plan_int16(QuantOptions(int16_budget=0.2, sensitivity=other), POINTS, WEIGHTS, "tiny", _never)
    for name in ("quantize", "fake_quantize"):  # the passes validate the options they inherit
        with pytest.raises(OptionError, match=f"'{name}': option 'int16_budget' must be in"):
            get_pass(name)(int16_budget=2.0)
        with pytest.raises(OptionError, match=f"'{name}': option 'percentile'"):
            get_pass(name)(percentile=20.0)


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00binary", "not UTF-8 text"),
    (b"[1, 2]", "needs a 'ranking' list"),
    (b'{"ranking": {"point": "a"}}', "needs a 'ranking' list"),
    (b'{"ranking": ["a"]}', "entry 0 must be an object"),
    (b'{"ranking": [{"kind": "activation"}]}', "entry 0 'point' must be a string"),
    (b'{"ranking": [{"point": "a", "kind": "bias"}]}', "'kind' must be"),
    (b'{"ranking": [{"point": "a", "drop": "high"}]}', "'drop' must be a number"),
    (b'{"ranking": [{"point": "a", "feeds": "l0.q"}]}', "'feeds' must be a list"),
    (b'{"ranking": [{"point": "a", "feeds": [1]}]}', "'feeds' must be a string"),
])
def test_a_malformed_ranking_is_refused_when_the_options_are_read(tmp_path, content, problem):
    path = tmp_path / "sensitivity.json"
    path.write_bytes(content)
    with pytest.raises(GraphoptError, match=problem):
        get_pass("quantize")(sensitivity=str(path))


def test_a_ranking_file_too_large_or_not_a_file_is_refused(tmp_path, monkeypatch):
    import graphopt.analysis.sensitivity as sensitivity

    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps({"ranking": [{"point": "a", "feeds": ["l0.q"]}]}))
    get_pass("fake_quantize")(sensitivity=str(path))
    monkeypatch.setattr(sensitivity, "MAX_SENSITIVITY_BYTES", 16)
    with pytest.raises(OptionError, match="more than the 16 a sensitivity file may have"):
        get_pass("fake_quantize")(sensitivity=str(path))
    with pytest.raises(OptionError, match="no such file"):
        get_pass("fake_quantize")(sensitivity=str(tmp_path))


def test_weight_specs():
    options = QuantOptions(weight_bits=4, weight_granularity="block", weight_block_size=16, embedding_bits=8,
                           int16_weights=("*.gain",))
    assert options.weight_spec("model.norm.gain", 1).dtype == "uint16"
    table = options.weight_spec("lm_head.weight.T", 0, table=True)
    assert (table.dtype, table.granularity, table.axis) == ("uint8", "channel", 0)
    block = options.weight_spec("l0.q", 1, block_axis=0)
    assert (block.dtype, block.granularity, block.axis, block.block_size) == ("uint4", "block", 0, 16)
    with pytest.raises(UnsupportedGraphError, match="'weight_block_size': weight 'l0.q' has no input axis"):
        options.weight_spec("l0.q", 1)
    assert options.excluded("lm_head.weight.T") is False and QuantOptions(exclude=("lm_head.weight",)).excluded(
        "lm_head.weight.T")


# ------------------------------------------------------------------------ both passes, one choice
@pytest.fixture(scope="module")
def calib():
    return [{"input_ids": w} for w in lm_windows(None, "calib", 4, 64)]


def _wide_inputs_onnx(model, calib, options) -> set[str]:
    """Weights (by weight_key) whose input the quantize pass put at 16 bits."""
    result = get_pass("quantize")(**options).run(model.copy(), PassContext(calib=calib, progress=False))
    wide = {n for n, e in result.model.meta.encodings.items() if e["kind"] == "activation" and e["bw"] == 16}
    return {weight_key(s.weight) for s in linear_sites(model) if s.activation in wide}


def _wide_inputs_fx(model, calib, options) -> set[str]:
    """Weights whose input the fake_quantize pass put at 16 bits."""
    model = model.copy()
    get_pass("fake_quantize")(**options).run(model, PassContext(calib=calib, progress=False))
    return {w for m in fake_quant.fake_quant_modules(model).values() if m.kind == "activation" and m.spec.bits == 16
            for w in m.feeds}


def test_both_passes_pick_the_same_16_bit_inputs(tiny_fx, tiny_onnx, calib, tmp_path):
    """A ranking in ONNX names (a tied table as NAME.T), an explicit glob and a budget over points:
    both forms choose the same weights' inputs; without a ranking, both rank by the same SQNR proxy."""
    sites = linear_sites(tiny_onnx)
    feeds: dict[str, list[str]] = {}
    for site in sites:
        feeds.setdefault(site.activation, []).append(site.weight)
    order = [list(feeds)[i] for i in (8, 2, 5, 0, 6, 1, 4, 3, 7)]  # lm_head input first, then a scramble
    path = _ranking(tmp_path, [{"point": p, "kind": "activation", "drop": 1.0 - i / 10, "feeds": feeds[p]}
                               for i, p in enumerate(order)])
    ranked = dict(int16_inputs=("*.layers.1.mlp.down_proj.weight",), int16_budget=0.25, int16_budget_over="points",
                  int16_weights=("model.layers.0.mlp.up_proj.weight",), sensitivity=path)
    onnx_choice, fx_choice = _wide_inputs_onnx(tiny_onnx, calib, ranked), _wide_inputs_fx(tiny_fx, calib, ranked)
    # floor(0.25 x 24) - 1 = 5 points: the named down_proj input, then the ranking's first four
    assert onnx_choice == fx_choice
    assert {"lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= fx_choice
    assert len([p for p in feeds if weight_key(feeds[p][0]) in fx_choice]) == 5
    proxy = dict(int16_budget=0.34)
    onnx_choice, fx_choice = _wide_inputs_onnx(tiny_onnx, calib, proxy), _wide_inputs_fx(tiny_fx, calib, proxy)
    assert onnx_choice == fx_choice and len([p for p in feeds if weight_key(feeds[p][0]) in fx_choice]) == 3


@pytest.mark.parametrize("options", [{}, {"weight_symmetric": True, "weight_bits": 4, "weight_range": "mse"}])
def test_both_passes_make_the_same_weight_grids(tiny_fx, tiny_onnx, calib, options):
    """The same options give every weight the same scales and offsets in both forms (the FX
    quantizer's [out] channels are the ONNX [in, out] weight's output axis)."""
    onnx_model = get_pass("quantize")(activation_bits=0, **options).run(tiny_onnx.copy(), PassContext(calib=calib, progress=False)).model
    onnx_params = Encodings.from_meta(onnx_model.meta.encodings).params
    fx_model = tiny_fx.copy()
    get_pass("fake_quantize")(activation_bits=0, **options).run(fx_model, PassContext(calib=calib, progress=False))
    modules = [m for m in fake_quant.fake_quant_modules(fx_model).values() if m.kind == "weight"]
    assert len(modules) == len(onnx_params) == 15
    by_key = {weight_key(name): encoding for name, encoding in onnx_params.items()}
    for module in modules:
        scale, zero_point = module.params()
        encoding = by_key[module.name]
        assert encoding.spec.dtype == module.spec.dtype, module.name
        np.testing.assert_allclose(scale.ravel(), encoding.scale, rtol=1e-6, err_msg=module.name)
        np.testing.assert_array_equal(zero_point.ravel(), encoding.zero_point(), err_msg=module.name)


def test_both_passes_exclude_the_same_weights_and_their_inputs(tiny_fx, tiny_onnx, calib):
    """`exclude` globs leave weights float in both forms, and an input only they read (down_proj's);
    the tied table is named by its FX name in both."""
    options = dict(exclude=("*.mlp.down_proj.weight", "lm_head.weight"))
    onnx_model = get_pass("quantize")(**options).run(tiny_onnx.copy(), PassContext(calib=calib, progress=False)).model
    encodings = onnx_model.meta.encodings
    onnx_weights = {weight_key(n) for n, e in encodings.items() if e["kind"] == "param"}
    onnx_inputs = {weight_key(s.weight) for s in linear_sites(tiny_onnx) if s.activation in encodings}
    fx_model = tiny_fx.copy()
    get_pass("fake_quantize")(**options).run(fx_model, PassContext(calib=calib, progress=False))
    modules = fake_quant.fake_quant_modules(fx_model).values()
    fx_weights = {m.name for m in modules if m.kind == "weight"}
    fx_inputs = {w for m in modules if m.kind == "activation" for w in m.feeds}
    assert onnx_weights == fx_weights and onnx_inputs == fx_inputs
    assert len(fx_weights) == 12 and not any("down_proj" in w or "lm_head" in w for w in fx_weights | fx_inputs)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_both_passes_make_the_same_activation_grids(tiny_fx, tiny_onnx, calib, observer):
    """Every observer gives each activation point the same scale (measured within 3e-7, float
    rounding of torch against onnxruntime) and zero point in both forms."""
    options = dict(observer=observer, percentile=99.9)
    onnx_model = get_pass("quantize")(**options).run(tiny_onnx.copy(), PassContext(calib=calib, progress=False)).model
    activations = Encodings.from_meta(onnx_model.meta.encodings).activations
    point_of = {weight_key(s.weight): s.activation for s in linear_sites(tiny_onnx)}
    fx_model = tiny_fx.copy()
    get_pass("fake_quantize")(**options).run(fx_model, PassContext(calib=calib, progress=False))
    modules = [m for m in fake_quant.fake_quant_modules(fx_model).values() if m.kind == "activation"]
    assert len(modules) == len(activations) == 9
    for module in modules:
        encoding = activations[point_of[module.feeds[0]]]
        scale, zero_point = module.params()
        np.testing.assert_allclose(scale.ravel(), encoding.scale, rtol=1e-5, err_msg=module.name)
        np.testing.assert_array_equal(zero_point.ravel(), encoding.zero_point(), err_msg=module.name)
