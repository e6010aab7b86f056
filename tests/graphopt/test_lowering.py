"""Lowering FX -> ONNX: signature, opset, stable weight names, numerics, the export cache."""

import numpy as np
import pytest

from graphopt.errors import GraphoptError
from graphopt.ir import MIN_OPSET
from graphopt.lowering import cache_dir, lower


@pytest.fixture(scope="module")
def lowered_fresh(tiny_fx, tmp_path_factory):
    """The tiny model lowered into an empty cache (a real export), plus the log it printed."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAPHOPT_CACHE", str(cache))
        lines = []
        model = lower(tiny_fx, log=lines.append)
    return model, lines, cache


def test_signature_and_opset(lowered_fresh):
    model, _, _ = lowered_fresh
    proto = model.to_onnx()
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= MIN_OPSET
    (inp,) = proto.graph.input
    assert inp.name == "input_ids" and inp.type.tensor_type.elem_type == 7  # int64
    dims = inp.type.tensor_type.shape.dim
    assert len(dims) == 2 and all(d.dim_param and not d.dim_value for d in dims)  # [batch, seq], dynamic
    assert [o.name for o in proto.graph.output][0] == "logits"
    assert model.inputs[0].shape == ("batch", "seq")


def test_matmul_weights_keep_parameter_names(lowered_fresh, tiny_fx):
    model, _, _ = lowered_fresh
    weights = {n.inputs[1].name for n in model.graph.nodes if n.op == "MatMul"}
    expected = {f"model.layers.{i}.{part}.weight" for i in range(2)
                for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert expected <= weights
    params = model.parameters()
    fx_weight = dict(tiny_fx.fx.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    assert params["model.layers.0.mlp.down_proj.weight"][0] == tuple(fx_weight.shape[::-1])  # stored [in, out]


def test_onnx_runtime_matches_torch(lowered_fresh, tiny_fx):
    model, _, _ = lowered_fresh
    rng = np.random.default_rng(0)
    for shape in [(1, 5), (3, 40)]:  # other batch and sequence sizes than the trace used
        feeds = {"input_ids": rng.integers(0, 256, shape).astype(np.int64)}
        (expected,) = tiny_fx.run(feeds)
        (got,) = model.run(feeds)
        assert got.shape == shape + (256,)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_cache_is_hit_the_second_time(lowered_fresh, tiny_fx, monkeypatch):
    model, first_log, cache = lowered_fresh
    assert any("exporting" in line for line in first_log)
    monkeypatch.setenv("GRAPHOPT_CACHE", str(cache))
    assert cache_dir() == cache
    assert len(list(cache.glob("exports/*/model.onnx"))) == 1
    import torch.onnx

    def no_export(*args, **kwargs):
        raise AssertionError("the exporter ran although the export is cached")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    lines = []
    again = lower(tiny_fx, log=lines.append)
    assert any("cached export" in line for line in lines)
    assert again.num_nodes() == model.num_nodes() and again.parameters() == model.parameters()


def test_lowering_needs_fx_and_a_recent_opset(lowered_fresh, tiny_fx):
    model, _, _ = lowered_fresh
    with pytest.raises(GraphoptError, match="FX"):
        lower(model)
    with pytest.raises(GraphoptError, match="opset >= 21"):
        lower(tiny_fx, opset=17)
