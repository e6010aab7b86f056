"""graphopt.analysis.diff: exact op-count deltas, rewiring by node name, weight changes, signature, regions."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.diff import diff_models, view_of
from graphopt.errors import UnsupportedGraphError
from graphopt.ir import Model


def _model(nodes, inits, *, out_type=TensorProto.FLOAT, out_name="y") -> Model:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(out_name, out_type, ["batch", 4])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _weight():
    return np.arange(1, 17, dtype=np.float32).reshape(4, 4)


def _before() -> Model:
    """x -> Relu -> Identity -> MatMul(W) -> y"""
    return _model([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["i"], name="ident"),
        helper.make_node("MatMul", ["i", "W"], ["y"], name="mm"),
    ], {"W": _weight()})


def _after() -> Model:
    """Identity gone (mm rewired to r), W half zeros, a bias Add appended."""
    w = _weight()
    w[:, :2] = 0
    return _model([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "B"], ["y"], name="bias"),
    ], {"W": w, "B": np.ones(4, np.float32)})


def test_summary_counts_exact_changes():
    summary = diff_models(_before(), _after()).summary()
    assert summary == {
        "ops_added": {"Add": 1},
        "ops_removed": {"Identity": 1},
        "nodes_rewired": 1,
        "initializers_changed": 2,
        "params": [16, 20],
        "bytes": [64, 80],
        "io_changed": False,
    }


def test_full_report_names_nodes_and_weight_sparsity():
    diff = diff_models(_before(), _after())
    full = diff.to_json()
    assert full["nodes_rewired"] == [{"name": "mm", "op": "MatMul", "inputs": [["i", "W"], ["r", "W"]]}]
    assert [r["name"] for r in full["nodes_removed"]] == ["ident"]
    assert [r["name"] for r in full["nodes_added"]] == ["bias"]
    weights = {w["name"]: w for w in full["initializers"]}
    assert weights["W"]["status"] == "changed"
    assert weights["W"]["sparsity"] == [0.0, 0.5]
    assert weights["W"]["shape"] == [[4, 4], [4, 4]]
    assert weights["B"]["status"] == "added" and weights["B"]["bytes"] == [0, 16]
    # ident (removed), mm (rewired) and bias (added) touch each other through r, i, m
    assert [sorted(r["nodes"]) for r in full["regions"]] == [["bias", "ident", "mm"]]
    text = diff.to_markdown()
    assert "| Identity | -1 |" in text and "| Add | +1 |" in text
    assert "| W | changed | [4, 4] | float32 | 64 | 0.0% → 50.0% |" in text


def test_identical_copies_show_no_difference():
    a = _before()
    diff = diff_models(a, a.copy())
    assert diff.unchanged
    assert diff.summary()["ops_added"] == {} and diff.summary()["initializers_changed"] == 0
    assert "No structural difference" in diff.to_markdown()


def test_same_values_in_a_new_array_are_unchanged():
    a, b = _before(), _before()  # separately built: equal values, different arrays
    assert diff_models(a, b).summary()["initializers_changed"] == 0


def test_shape_and_dtype_changes_are_reported_without_comparing_values():
    b = _model([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["i"], name="ident"),
        helper.make_node("MatMul", ["i", "W"], ["y"], name="mm"),
    ], {"W": np.zeros((4, 4), np.float16)})
    (change,) = diff_models(_before(), b).weights
    assert change.dtype == ("float32", "float16") and change.bytes == (64, 32)
    assert change.sparsity == (0.0, 1.0)


def test_signature_change():
    b = _model([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["i"], name="ident"),
        helper.make_node("MatMul", ["i", "W"], ["out"], name="mm"),
    ], {"W": _weight()}, out_name="out")
    diff = diff_models(_before(), b)
    assert diff.summary()["io_changed"] is True
    assert [o["name"] for o in diff.outputs["removed"]] == ["y"]
    assert [o["name"] for o in diff.outputs["added"]] == ["out"]
    assert "output added: out" in diff.to_markdown()


def test_two_separate_edits_are_two_regions(tiny_onnx):
    b = tiny_onnx.copy()
    negs = [n for n in b.graph.nodes if n.op == "Neg"][:2]
    for neg in negs:  # bypass: consumers read the Neg's input
        src, dst = neg.inputs[0], neg.outputs[0]
        for consumer in list(dst.outputs):
            consumer.inputs[consumer.inputs.index(dst)] = src
    b.graph.cleanup().toposort()
    diff = diff_models(tiny_onnx, b)
    assert diff.summary()["ops_removed"] == {"Neg": 2}
    assert diff.summary()["nodes_rewired"] == 2
    assert len(diff.regions) == 2


def test_tiny_model_weight_change_and_fx_form(tiny_fx, tiny_onnx):
    b = tiny_onnx.copy()
    name = "model.layers.0.mlp.up_proj.weight"
    tensor = b.graph.tensors()[name]
    values = tensor.values.copy()
    values[:, ::2] = 0
    tensor.values = values  # a new array, as passes do
    summary = diff_models(tiny_onnx, b).summary()
    assert summary["initializers_changed"] == 1 and summary["ops_added"] == {}

    fx_b = tiny_fx.copy()
    import torch

    with torch.no_grad():
        dict(fx_b.fx.named_parameters())["model.layers.1.mlp.down_proj.weight"].zero_()
    fx_diff = diff_models(tiny_fx, fx_b)
    assert fx_diff.form == "fx"
    assert [(w.name, w.sparsity) for w in fx_diff.weights] == [("model.layers.1.mlp.down_proj.weight", (0.0, 1.0))]
    assert fx_diff.summary()["nodes_rewired"] == 0
    assert "aten.linear.default" in {n.op for n in view_of(tiny_fx).nodes.values()}


def test_forms_must_match(tiny_fx, tiny_onnx):
    with pytest.raises(UnsupportedGraphError, match="same form"):
        diff_models(tiny_fx, tiny_onnx)


def test_graphopt_diff_api():
    import graphopt

    assert graphopt.diff(_before(), _after()).summary()["ops_removed"] == {"Identity": 1}


def test_int4_weights_and_retyped_nodes():
    import ml_dtypes

    w4 = (np.arange(16).reshape(4, 4) % 3 == 0).astype(ml_dtypes.int4)
    b = _model([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["r"], ["i"], name="ident"),
        helper.make_node("MatMul", ["i", "W"], ["y"], name="mm"),
    ], {"W": _weight()})
    b.graph.tensors()["W"].values = w4
    diff = diff_models(_before(), b)
    assert diff.nodes_retyped == [{"name": "ident", "op": ["Identity", "Sigmoid"]}]
    (change,) = diff.weights
    assert change.dtype == ("float32", "int4") and change.bytes == (64, 8)
    assert change.sparsity == (0.0, 1 - 6 / 16)
    assert "| ident | Identity | Sigmoid |" in diff.to_markdown()
