"""smooth_quant: exact in float (a fold skipped, the broken variant, is not), where it folds, when it
must not fire, its errors; SmolLM2 for real.

Exactness is measured as the largest output difference relative to the largest output: 8.7e-7
on the tiny Llama (float32 rounding), asserted below 1e-5; without the fold into the producer 0.74.
"""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt.quant.smoothing as smoothing_module
from graphopt.errors import OptionError
from graphopt.frontends.corpora import lm_windows
from graphopt.ir import Model
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext

SmoothQuant = get_pass("smooth_quant")
TOLERANCE = 1e-5  # of the largest output value


@pytest.fixture(scope="module")
def tiny_calib():
    return PassContext(calib=[{"input_ids": w} for w in lm_windows(None, "calib", 4, 64)], progress=False)


@pytest.fixture(scope="module")
def tiny_eval():
    return [{"input_ids": w} for w in lm_windows(None, "eval", 2, 64)]


def assert_same_function(before: Model, after: Model, feeds: list[dict]) -> None:
    for feed in feeds:
        reference = before.run(feed)[0]
        np.testing.assert_allclose(after.run(feed)[0], reference, rtol=0, atol=TOLERANCE * np.abs(reference).max())


def _values(model: Model, name: str) -> np.ndarray:
    return np.asarray(model.graph.tensors()[name].values)


def test_smoothing_is_exact_in_float(tiny_onnx, tiny_calib, tiny_eval, monkeypatch):
    """Six points (per layer: the q/k/v input and the gate/up input, folded into their RMSNorm gains;
    the down_proj input, folded into up_proj's columns); o_proj's input (a Reshape) and the lm_head's
    (its table is also the embedding) are left alone."""
    result = SmoothQuant(alpha=0.5).run(tiny_onnx.copy(), tiny_calib)
    assert result.changed and result.stats == {"smoothed": 6}
    assert_same_function(tiny_onnx, result.model, tiny_eval)
    changed = {name for name in tiny_onnx.parameters() if not np.array_equal(_values(tiny_onnx, name), _values(result.model, name))}
    for layer in (0, 1):
        prefix = f"model.layers.{layer}"
        assert {f"{prefix}.self_attn.{p}_proj.weight" for p in "qkv"} <= changed
        assert {f"{prefix}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} <= changed
        assert f"{prefix}.self_attn.o_proj.weight" not in changed
    assert "lm_head.weight.T" not in changed
    assert len(changed) == 2 * (3 + 3) + 4  # and the four RMSNorm gains in front of q/k/v and gate/up

    monkeypatch.setattr(smoothing_module, "divide_columns", lambda constant, s: None)  # skip the fold into the producer
    broken = SmoothQuant(alpha=0.5).run(tiny_onnx.copy(), tiny_calib).model
    with pytest.raises(AssertionError):
        assert_same_function(tiny_onnx, broken, tiny_eval)


def _chain_model(residual: bool = False) -> Model:
    """x @ w1 -> h -> h @ w2 -> y (and, with `residual`, y + h: h has a reader outside the match)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w1[:, 3] *= 40.0  # an outlier channel of h
    w2 = rng.standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    output = "y"
    if residual:
        nodes.append(helper.make_node("Add", ["y", "h"], ["z"]))
        output = "z"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [4, 16])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_a_linear_producer_takes_the_factors_in_its_columns():
    """Rule 1c: h = x @ w1 feeds only h @ w2; w1's columns are divided, w2's rows multiplied."""
    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 8)).astype(np.float32)} for i in range(3)]
    model = _chain_model()
    result = SmoothQuant(alpha=0.5).run(model.copy(), PassContext(calib=feeds, progress=False))
    assert result.stats == {"smoothed": 1}
    assert_same_function(model, result.model, feeds)
    ratio = _values(model, "w1") / _values(result.model, "w1")  # s per column of w1
    assert ratio[:, 3].mean() > 3 * np.median(ratio)  # the outlier channel moved most


def test_nothing_smoothable_leaves_the_model_untouched(tiny_onnx, tiny_calib):
    model = tiny_onnx.copy()
    before = model.to_onnx().SerializeToString()
    result = SmoothQuant(weights=("no-such-weight",)).run(model, tiny_calib)
    assert not result.changed and result.model.to_onnx().SerializeToString() == before
    residual = _chain_model(residual=True)  # h is also read by the Add: dividing it would change z
    before = residual.to_onnx().SerializeToString()
    result = SmoothQuant().run(residual, PassContext(calib=None, progress=False))
    assert not result.changed and residual.to_onnx().SerializeToString() == before


def test_weights_limit_smoothing_to_the_named_linears(tiny_onnx, tiny_calib, tiny_eval):
    result = SmoothQuant(weights=("*layers.0.mlp.down_proj*",)).run(tiny_onnx.copy(), tiny_calib)
    assert result.stats == {"smoothed": 1}
    changed = {name for name in tiny_onnx.parameters() if not np.array_equal(_values(tiny_onnx, name), _values(result.model, name))}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    assert_same_function(tiny_onnx, result.model, tiny_eval)


def test_errors(tiny_onnx):
    for alpha in (0.0, -0.5, 1.5):
        with pytest.raises(OptionError, match="'smooth_quant': option 'alpha' must be in \\(0, 1\\]"):
            SmoothQuant(alpha=alpha)
    with pytest.raises(OptionError, match="smooth_quant needs calibration data"):
        SmoothQuant().run(tiny_onnx.copy(), PassContext(calib=None, progress=False))


@pytest.mark.real
def test_smollm2_smoothing_is_exact(smollm2_onnx, smollm2_calib, smollm2_eval):
    """30 layers x (q/k/v input, gate/up input, down_proj input); the logits stay the float logits."""
    result = SmoothQuant(alpha=0.5).run(smollm2_onnx.copy(), PassContext(calib=smollm2_calib, progress=False))
    assert result.stats == {"smoothed": 90}
    assert_same_function(smollm2_onnx, result.model, [{"input_ids": w} for w in smollm2_eval[:2]])
