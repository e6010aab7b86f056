"""pruning_graph: attention / FFN / conv structures found in the graph, coupled tensors, what did not match."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.pruning_graph import dependency_graph, find_structures, shape_entries
from graphopt.ir import Model


def conv_model(batch_norm: bool = True) -> Model:
    """x → Conv(3→8) → [BatchNorm] → Relu → Conv(8→6) → Relu → Conv(6→4) → ReduceMean → y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (6, 8, 3, 3)), ("b2", (6,)), ("w3", (4, 6, 1, 1))]]
    inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
              [("scale", rng.uniform(0.5, 1.5, 8)), ("beta", rng.standard_normal(8)),
               ("mean", rng.standard_normal(8)), ("var", rng.uniform(0.5, 1.5, 8))]]
    inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    if batch_norm:
        nodes.append(helper.make_node("BatchNormalization", ["c1", "scale", "beta", "mean", "var"], ["n1"], name="bn1"))
    nodes += [
        helper.make_node("Relu", ["n1" if batch_norm else "c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"),
        helper.make_node("ReduceMean", ["c3", "axes"], ["y"], keepdims=0, name="pool"),
    ]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(proto)
    model = Model.from_onnx(proto, name="convs")
    model.sample_inputs = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}]
    return model


def test_tiny_llama_gqa_attention_and_ffn_found_in_graph(tiny_onnx):
    found = find_structures(tiny_onnx)
    assert found.summary() == {"attention": 2, "ffn": 2, "conv": 0, "unmatched": 0}
    att = found.attention[0]
    assert (att.num_heads, att.num_kv_heads, att.head_dim, att.group_size) == (4, 2, 16, 2)
    assert att.q.weight.endswith("layers.0.self_attn.q_proj.weight") and att.o.weight == att.name
    # the GQA repeat: Expand [b, kv, rep, s, d] and Reshape [b, heads, s, d], for K and for V
    assert sorted(s.kind for s in att.shape_sites) == ["kv_heads", "kv_heads", "q_heads", "q_heads"]
    assert {s.position for s in att.shape_sites} == {1}
    coupled = {name: (axis, width) for name, axis, width in att.coupled()}
    assert coupled[att.q.weight] == (1, 32) and coupled[att.k.weight] == (1, 16) and coupled[att.o.weight] == (0, 32)
    ffn = found.ffn[0]
    assert ffn.width == 128 and ffn.down.weight.endswith("layers.0.mlp.down_proj.weight")
    assert sorted(p.weight.split(".")[-2] for p in ffn.inputs) == ["gate_proj", "up_proj"]


def test_names_do_not_matter(tiny_onnx):
    """The finder walks the graph: renaming every weight finds the same structures."""
    model = tiny_onnx.copy()
    for i, tensor in enumerate(t for t in model.graph.tensors().values() if hasattr(t, "values")):
        tensor.name = f"w{i}"
    assert find_structures(model).summary() == {"attention": 2, "ffn": 2, "conv": 0, "unmatched": 0}


@pytest.mark.real
def test_minilm_mha_with_biases(minilm_onnx):
    found = find_structures(minilm_onnx)
    assert found.summary() == {"attention": 6, "ffn": 6, "conv": 0, "unmatched": 0}
    att = found.attention[0]
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (12, 12, 32)
    assert att.q.bias and att.k.bias and att.v.bias and att.shape_sites == []  # heads reshaped with -1
    assert len(found.ffn[0].inputs) == 1 and found.ffn[0].down.bias  # GELU MLP with biases


def test_conv_chain_with_batch_norm_and_what_did_not_match():
    found = find_structures(conv_model())
    assert [g.name for g in found.conv] == ["w1", "w2"]
    assert found.conv[0].batch_norm == "bn1" and found.conv[0].followers[0].weight == "w2"
    assert found.conv[0].coupled() == [("w1", 0, 1), ("b1", 0, 1), ("w2", 1, 1)]
    assert found.unmatched == ["Conv 'conv3': its channels reach ReduceMean 'pool', not only Conv inputs"]


def test_unmatched_softmax_is_named():
    nodes = [helper.make_node("Softmax", ["x"], ["y"], name="lonely_softmax")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    found = find_structures(Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])))
    assert found.attention == [] and "lonely_softmax" in found.unmatched[0] and "MatMul(Q" in found.unmatched[0]


def test_shared_weight_is_not_prunable(tiny_onnx):
    """A down_proj weight also read elsewhere is reported, never sliced."""
    model = tiny_onnx.copy()
    down = find_structures(model).ffn[0].down
    weight = model.graph.tensors()[down.weight]
    import onnx_graphsurgeon as gs
    extra = gs.Variable("extra_out", dtype=np.float32)
    model.graph.nodes.append(gs.Node("Identity", "reader", inputs=[weight], outputs=[extra]))
    model.graph.outputs.append(extra)
    found = find_structures(model)
    assert len(found.ffn) == 1 and any(down.weight in u and "read by 2 nodes" in u for u in found.unmatched)


def test_shape_entries_and_dependency_graph(tiny_onnx):
    tensors = tiny_onnx.graph.tensors()
    att = find_structures(tiny_onnx).attention[0]
    site = next(s for s in att.shape_sites if s.kind == "kv_heads")
    expand = next(n for n in tiny_onnx.graph.nodes if n.name == site.node)
    assert expand.op == "Expand" and expand.inputs[1].inputs[0].op == "Concat"
    entries = shape_entries(expand.inputs[1])
    assert entries[1:3] == [2, 2] and entries[0] is None and entries[-1] == 16
    assert shape_entries(tensors["lm_head.weight.T"]) is not None  # a constant is read as is
    dg = dependency_graph(tiny_onnx.graph)
    assert dg.number_of_nodes() == len(tiny_onnx.graph.nodes)
    import networkx as nx
    assert nx.has_path(dg, att.q.node, att.o.node) and nx.has_path(dg, att.k.node, att.o.node)
