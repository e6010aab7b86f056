"""Upgrading old-opset ONNX models: converted, checked against the original, refused by op or output."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import UnsupportedGraphError
from graphopt.frontends import onnx_opset
from graphopt.frontends.onnx_opset import synthesized_feeds, upgrade_opset
from graphopt.ir import Model, graph_opset
from tests.vision import tiny_vision_model


def _single(op, opset, inputs=("x",), inits=(), **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node(op, list(inputs), ["y"], name=f"{op.lower()}_0", **attrs)], "g", [x], [y],
                              initializer=list(inits))
    return Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=4),
                           name=op.lower())


def test_an_opset_9_upsample_becomes_resize_with_the_same_outputs():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")
    model = _single("Upsample", 9, ("x", "s"), (scales,), mode="nearest")
    feeds = synthesized_feeds(model)
    upgraded, record = upgrade_opset(model, feeds=feeds)
    assert graph_opset(upgraded.graph) == 21 and upgraded.ir_version >= 10
    assert [n.op for n in upgraded.graph.nodes if n.op != "Constant"] == ["Resize"]
    assert record.stats() == {"from_opset": 9, "to_opset": 21, "max_abs_diff": 0.0, "cosine": pytest.approx(1.0),
                              "checked_on": "given inputs", "replaced_ops": {"Upsample": 1}}
    np.testing.assert_array_equal(upgraded.run(feeds)[0], np.repeat(np.repeat(feeds["x"], 2, 2), 2, 3))
    assert graph_opset(model.graph) == 9  # the input model is left as it was


def test_a_model_at_the_target_opset_is_returned_as_it_is(tmp_path):
    model = graphopt.load(str(tiny_vision_model(tmp_path / "v.onnx", opset=21)))
    same, record = upgrade_opset(model)
    assert same is model and (record.from_opset, record.to_opset) == (21, 21)


def test_synthesized_inputs_fill_dynamic_axes(tmp_path):
    model = graphopt.load(str(tiny_vision_model(tmp_path / "v.onnx", opset=13, size=None)))
    assert synthesized_feeds(model)["x"].shape == (1, 3, 32, 32)
    upgraded, record = upgrade_opset(model)
    assert record.checked_on == "synthesized inputs" and record.max_abs_diff < 1e-6 and graph_opset(upgraded.graph) == 21


def test_an_op_without_an_adapter_is_named():
    with pytest.raises(UnsupportedGraphError, match=r"model 'imagescaler': onnx's version converter cannot take "
                                                    r"opset 9 to 21: op ImageScaler: .*export the model again"):
        upgrade_opset(_single("ImageScaler", 9, scale=2.0))


def test_an_upgrade_that_changes_the_outputs_is_refused(tmp_path, monkeypatch):
    model = graphopt.load(str(tiny_vision_model(tmp_path / "v.onnx", opset=13)))
    convert = onnx_opset._convert

    def broken(proto, target, where):  # a converter that scaled a weight by 1.01: caught by the check
        upgraded = convert(proto, target, where)
        w1 = next(t for t in upgraded.graph.initializer if t.name == "w1")
        w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1) * 1.01, "w1"))
        return upgraded

    monkeypatch.setattr(onnx_opset, "_convert", broken)
    with pytest.raises(UnsupportedGraphError, match=r"output 'y' differs by [0-9.e-]+ \(relative\) after onnx's version "
                                                    r"converter took it from opset 13 to 21"):
        upgrade_opset(model)


def test_inputs_the_original_cannot_run_are_reported(tmp_path):
    model = graphopt.load(str(tiny_vision_model(tmp_path / "v.onnx", opset=13)))
    with pytest.raises(UnsupportedGraphError, match=r"onnxruntime cannot run the original \(opset 13\) model"):
        upgrade_opset(model, feeds={"x": np.zeros((1, 3, 8, 8), np.float32)})
    assert onnx.helper.find_min_ir_version_for([helper.make_opsetid("", 21)]) == 10
