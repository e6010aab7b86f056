"""cleanup: dead nodes, no-op Identity/Cast, static shape and constant folding, outputs unchanged."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import OptionError
from graphopt.ir import Model
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext

Cleanup = get_pass("cleanup")
RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 5)).astype(np.float32)


def ops(model: Model) -> Counter:
    return Counter(n.op for n in model.graph.nodes)


def proto_model(nodes, outputs, initializers=(), value_info=()) -> Model:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4])],
        outputs, initializer=list(initializers), value_info=list(value_info),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(proto)
    return Model.from_onnx(proto)


def messy_model() -> Model:
    """Every rule has something to do: dead Relu, two Identities, a same-dtype Cast, a shape chain."""
    nodes = [
        helper.make_node("Relu", ["x"], ["dead"]),                          # rule 1
        helper.make_node("Identity", ["x"], ["x_id"]),                      # rule 2
        helper.make_node("Cast", ["x_id"], ["x_cast"], to=TensorProto.FLOAT),  # rule 3
        helper.make_node("Shape", ["x_cast"], ["shape"]),                   # rule 4 chain
        helper.make_node("Gather", ["shape", "two"], ["last"], axis=0),
        helper.make_node("Unsqueeze", ["last", "zero"], ["last1"]),
        helper.make_node("Concat", ["minus_one", "last1"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x_cast", "new_shape"], ["rows"]),
        helper.make_node("MatMul", ["rows", "W"], ["mm"]),
        helper.make_node("Identity", ["mm"], ["y"]),                         # rule 2 at an output
        helper.make_node("Identity", ["x"], ["x_out"]),                      # must stay: input -> output
    ]
    inits = [
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(W, "W"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 5]),
               helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", 3, 4])]
    value_info = [helper.make_tensor_value_info("x_id", TensorProto.FLOAT, ["batch", 3, 4])]
    return Model.from_onnx(helper.make_model(
        helper.make_graph(nodes, "messy",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4])],
                          outputs, initializer=inits, value_info=value_info),
        opset_imports=[helper.make_opsetid("", 21)]))


def clean_model() -> Model:
    """Nothing to do: a real Cast, a dynamic shape, a DequantizeLinear, an input->output Identity."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], start=0, end=1),  # batch: dynamic
        helper.make_node("Concat", ["shape", "minus_one"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["flat"]),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["w"]),  # quantization boundary: stays
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Cast", ["mm"], ["y"], to=TensorProto.DOUBLE),
        helper.make_node("Identity", ["x"], ["x_out"]),
    ]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             numpy_helper.from_array(RNG.integers(-8, 8, (12, 2)).astype(np.int8), "q"),
             numpy_helper.from_array(np.array(0.5, np.float32), "scale")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 2]),
               helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", 3, 4])]
    return proto_model(nodes, outputs, inits)


def feeds(batch=2):
    return {"x": RNG.standard_normal((batch, 3, 4)).astype(np.float32)}


def test_messy_graph_exact_counts_and_rewiring():
    model = messy_model()
    x = feeds()
    before = model.run(x)
    result = Cleanup().run(model, PassContext())

    assert result.changed
    assert ops(result.model) == {"Reshape": 1, "MatMul": 1, "Identity": 1}
    # Relu dead at once; Shape dead once its Gather folded
    assert result.stats == {"dead_nodes": 2, "identities": 2, "noop_casts": 1,
                            "folded_shapes": 1, "folded_constants": 2}
    graph = result.model.graph
    reshape = next(n for n in graph.nodes if n.op == "Reshape")
    assert reshape.inputs[0] is graph.inputs[0]  # Identity and Cast bypassed, by identity
    np.testing.assert_array_equal(reshape.inputs[1].values, [-1, 4])
    matmul = next(n for n in graph.nodes if n.op == "MatMul")
    assert matmul.outputs[0] is graph.outputs[0] and graph.outputs[0].name == "y"
    kept = next(n for n in graph.nodes if n.op == "Identity")
    assert kept.inputs[0] is graph.inputs[0] and kept.outputs[0] is graph.outputs[1]
    assert [o.name for o in graph.outputs] == ["y", "x_out"]

    after = result.model.run(x)
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    other = feeds(batch=5)  # the folded shape must not have frozen the dynamic batch
    np.testing.assert_allclose(result.model.run(other)[0], (other["x"].reshape(-1, 4) @ W), atol=1e-5)


def test_clean_graph_is_untouched():
    model = clean_model()
    before = model.to_onnx().SerializeToString()
    result = Cleanup().run(model, PassContext())
    assert result.changed is False
    assert result.stats == {}
    assert result.model.to_onnx().SerializeToString() == before


def test_options_switch_rules_off():
    result = Cleanup(fold_constants=False, remove_identities=False, remove_noop_casts=False).run(
        messy_model(), PassContext())
    assert result.stats == {"dead_nodes": 1}
    assert ops(result.model)["Identity"] == 3 and ops(result.model)["Cast"] == 1


def test_large_fold_skipped_so_weights_are_not_copied():
    """Tile of a constant would make an 80 kB initializer; under a 1 kB limit it stays a node."""
    nodes = [helper.make_node("Tile", ["W", "reps"], ["big"]),
             helper.make_node("ReduceSum", ["big", "axes"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero_f"], ["s5"]),
             helper.make_node("Slice", ["s5", "starts", "ends"], ["s4"]),
             helper.make_node("Add", ["x", "s4"], ["y"])]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array([1000, 1], np.int64), "reps"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
             numpy_helper.from_array(np.array([0], np.int64), "starts"),
             numpy_helper.from_array(np.array([4], np.int64), "ends")]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4])]
    model = proto_model(nodes, out, inits)
    result = Cleanup(fold_size_limit=1024).run(model, PassContext())
    assert result.changed is False
    assert result.stats == {"fold_skipped_large": 1}
    assert ops(result.model)["Tile"] == 1
    assert result.model.num_bytes() < 1024  # no 80 kB constant appeared

    folded = Cleanup().run(proto_model(nodes, out, inits), PassContext())
    assert ops(folded.model) == {"Add": 1}


@pytest.mark.parametrize("shared", [True, False])
def test_a_view_of_a_constant_other_nodes_read_stays_a_view(shared):
    """A Reshape of a 16 kB table the MatMul also reads would store the table twice; read by the
    Reshape only, it folds (the table is then held once, in its new shape)."""
    table = RNG.standard_normal((4, 1024)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["T", "shape"], ["flat"]),
             helper.make_node("ReduceSum", ["flat", "axes"], ["s"], keepdims=0),
             helper.make_node("Mul", ["x", "s"], ["y"])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", "T"], ["z"]))
    inits = [numpy_helper.from_array(table, "T"), numpy_helper.from_array(np.array([4096], np.int64), "shape"),
             numpy_helper.from_array(np.array([0], np.int64), "axes")]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4])]
    if shared:
        out.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3, 1024]))
    model = proto_model(nodes, out, inits)
    result = Cleanup().run(model, PassContext())
    assert result.model.num_bytes() < table.nbytes + 1024  # never the table twice
    assert ops(result.model)["Reshape"] == shared


@pytest.mark.parametrize("options", [{"fold_constants": "yes"}, {"fold_size_limit": 1.5},
                                     {"fold_size_limit": -1}, {"remove_dead": True}])
def test_bad_options_raise_option_error(options):
    with pytest.raises(OptionError, match=next(iter(options))):
        Cleanup.from_options(options)


def test_fx_model_rejected(tiny_fx):
    from graphopt.errors import UnsupportedGraphError

    with pytest.raises(UnsupportedGraphError, match="cleanup"):
        Cleanup().run(tiny_fx, PassContext())


def test_tiny_llama_outputs_unchanged(tiny_onnx):
    model = tiny_onnx.copy()
    feeds_ = {"input_ids": RNG.integers(0, 256, (3, 19)).astype(np.int64)}
    before = model.run(feeds_)[0]
    n_before = model.num_nodes()
    result = Cleanup().run(model, PassContext())
    assert result.changed and result.stats.get("folded_shapes", 0) >= 2
    assert result.model.num_nodes() == n_before - sum(
        v for k, v in result.stats.items() if k in ("dead_nodes", "identities", "noop_casts", "folded_shapes", "folded_constants"))
    # only shape arithmetic is folded: onnxruntime computes the same floats, bit for bit
    np.testing.assert_array_equal(result.model.run(feeds_)[0], before)
    assert Cleanup().run(result.model, PassContext()).changed is False  # idempotent


@pytest.mark.real
def test_smollm2_outputs_unchanged(smollm2_onnx):
    model = smollm2_onnx.copy()
    feeds_ = {"input_ids": smollm2_onnx.sample_inputs[0]["input_ids"][:, :48]}
    before = model.run(feeds_)[0]
    nodes, size = model.num_nodes(), model.num_bytes()
    result = Cleanup().run(model, PassContext())
    # 30 layers each slice head_dim out of a partly dynamic shape
    assert result.changed and result.stats.get("folded_shapes", 0) >= 30
    assert result.model.num_nodes() <= nodes - 30
    assert result.model.num_bytes() - size < 4096  # only small shape constants, no weight copies
    weights = {name for name in smollm2_onnx.parameters() if name.endswith("weight")}
    assert weights <= set(result.model.parameters())  # parameter names kept
    np.testing.assert_allclose(result.model.run(feeds_)[0], before, rtol=0, atol=1e-6)


def test_unsorted_graph_is_sorted():
    model = messy_model()
    proto = model.to_onnx()
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))
    result = Cleanup(fold_constants=False, remove_identities=False, remove_noop_casts=False).run(
        Model.from_onnx(proto), PassContext())
    assert result.changed and result.stats == {"dead_nodes": 1, "reordered": 1}
    onnx.checker.check_model(result.model.to_onnx())  # the checker refuses unsorted graphs


def test_identity_named_by_an_encoding_stays():
    model = messy_model()
    model.meta.encodings["x_id"] = {"bitwidth": 8, "scale": [0.1]}
    result = Cleanup(fold_constants=False).run(model, PassContext())
    assert result.stats["identities"] == 1  # only mm -> y went
    assert "x_id" in {t.name for n in result.model.graph.nodes for t in n.outputs}


def test_sequence_values_are_not_folded_into_tensors():
    """SequenceEmpty has no inputs, so it looked foldable; its value is a sequence, not a tensor."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    zero = helper.make_tensor("zero_value", TensorProto.INT64, [], [0])
    nodes = [helper.make_node("SequenceEmpty", [], ["s0"], dtype=TensorProto.FLOAT, name="empty"),
             helper.make_node("SequenceInsert", ["s0", "x"], ["s1"], name="insert"),
             helper.make_node("Constant", [], ["zero"], value=zero, name="zero"),
             helper.make_node("SequenceAt", ["s1", "zero"], ["y"], name="at")]
    proto = helper.make_model(helper.make_graph(nodes, "seq", [x], [y]), opset_imports=[helper.make_opsetid("", 21)])
    model = Model.from_onnx(proto)
    result = Cleanup().run(model.copy(), PassContext())
    assert "empty" in {n.name for n in result.model.graph.nodes}
    out = result.model.to_onnx()
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": np.array([1.5, -2.0], np.float32)}
    np.testing.assert_array_equal(result.model.run(feeds)[0], feeds["x"])
