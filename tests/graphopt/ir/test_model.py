"""The Model handle: one form at a time, metadata round trips, deep copies, sizes."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import GraphoptError, UnsupportedGraphError
from graphopt.ir.model import PROVENANCE_KEY, Model, ModelMeta, TensorSpec


def onnx_model() -> Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.ones((3, 2), np.float32), "W"),
                     numpy_helper.from_array(np.zeros(2, np.float32), "b")],
    )
    return Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_exactly_one_form():
    with pytest.raises(GraphoptError, match="exactly one form"):
        Model(inputs=[], outputs=[])
    model = onnx_model()
    assert model.form == "onnx"
    with pytest.raises(UnsupportedGraphError, match="FX"):
        model.require("fx", "some pass")


def test_signature_and_sizes():
    model = onnx_model()
    assert model.inputs == [TensorSpec("x", "float32", ("batch", 3))]
    assert model.outputs == [TensorSpec("y", "float32", ("batch", 2))]
    assert model.parameters() == {"W": ((3, 2), "float32", 24), "b": ((2,), "float32", 8)}
    assert (model.num_nodes(), model.num_params(), model.num_bytes()) == (2, 8, 32)


def test_metadata_and_provenance_round_trip():
    model = onnx_model()
    model.meta.encodings["W"] = {"bitwidth": 8, "scale": [0.5]}
    model.meta.masks["W"] = {"pattern": "2:4"}
    model.meta.provenance["add"] = "some_pass"
    proto = model.to_onnx()
    add = next(n for n in proto.graph.node if n.name == "add")
    assert {p.key: p.value for p in add.metadata_props} == {PROVENANCE_KEY: "some_pass"}
    again = Model.from_onnx(proto)
    assert again.meta.encodings == {"W": {"bitwidth": 8, "scale": [0.5]}}
    assert again.meta.masks == {"W": {"pattern": "2:4"}}
    assert ModelMeta.from_json({"encodings": {}, "unknown_key": 1}).encodings == {}


def test_copy_is_deep_replace_is_shallow():
    model = onnx_model()
    model.meta.encodings["W"] = {"bitwidth": 8}
    copied = model.copy()
    copied.graph.nodes[0].inputs[1].values[:] = 7.0
    copied.meta.encodings["W"]["bitwidth"] = 4
    assert float(model.graph.nodes[0].inputs[1].values.max()) == 1.0
    assert model.meta.encodings["W"]["bitwidth"] == 8
    shared = model.replace(name="other")
    assert shared.graph is model.graph and shared.name == "other"


def test_onnx_run_matches_numpy():
    model = onnx_model()
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    (y,) = model.run({"x": x})
    np.testing.assert_allclose(y, x @ np.ones((3, 2), np.float32), atol=1e-6)
    run = model.runner()
    np.testing.assert_array_equal(run({"x": x})[0], y)


def test_int4_bytes_are_packed():
    import ml_dtypes

    model = onnx_model()
    model.graph.nodes[0].inputs[1].values = np.zeros((3, 3), ml_dtypes.int4)
    assert model.parameters()["W"] == ((3, 3), "int4", 5)  # 9 values, two per byte


@pytest.mark.parametrize("options", [{}, {"weight_bits": 4, "weight_granularity": "block", "weight_block_size": 16,
                                          "weight_symmetric": True}])
def test_weight_encodings_live_in_the_graph_not_twice(tiny_onnx, tmp_path, options):
    """A saved QDQ model keeps its weights' encodings in the DequantizeLinears only; reading it
    back restores model.meta.encodings exactly."""
    from graphopt.ir.model import META_KEY
    from graphopt.ir.onnx_files import load_onnx
    from graphopt.pipeline import get_pass
    from graphopt.pipeline.passes import PassContext

    quantized = get_pass("quantize")(**options).run(
        tiny_onnx.copy(), PassContext(calib=tiny_onnx.sample_inputs, progress=False)).model
    weights = {n for n, e in quantized.meta.encodings.items() if e["kind"] == "param"}
    stored = next(p.value for p in quantized.to_onnx().metadata_props if p.key == META_KEY)
    assert weights and not any(f'"{name}": {{' in stored for name in weights)
    back = Model.from_onnx(load_onnx(quantized.save(tmp_path / "q.onnx")))
    assert back.meta.encodings == quantized.meta.encodings
