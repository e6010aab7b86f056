"""graphopt.analysis.inspect: op histogram, sizes, signature, quantization and sparsity status."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.inspect import summarize, to_markdown
from graphopt.ir import Model


def _two_four(rows: int, cols: int) -> np.ndarray:
    """Non-zero on rows 0,1 of every group of 4 rows: 2:4 along axis 0 (MatMul's input dim)."""
    w = np.arange(1, rows * cols + 1, dtype=np.float32).reshape(rows, cols)
    w.reshape(rows // 4, 4, cols)[:, 2:, :] = 0
    return w


def _qdq_model() -> Model:
    """x -> Q -> DQ -> MatMul(DQ(int8 W, 2:4)) -> MatMul(F, half zero columns) -> y"""
    wq = _two_four(8, 8).astype(np.int8)
    f = np.ones((8, 8), np.float32)
    f[:, :4] = 0  # 50 % zeros, but every group along the input dim is dense
    inits = {
        "s": np.float32(0.1), "zp": np.int8(0), "WQ": wq, "ws": np.float32(0.05), "F": f,
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["WQ", "ws"], ["wd"], name="dqw"),
        helper.make_node("MatMul", ["xd", "wd"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "F"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), name="qdq")
    model.meta.encodings["x"] = {"scale": 0.1}
    model.meta.masks["F"] = {"pattern": "unstructured", "ratio": 0.5}
    return model


def test_quantization_status():
    q = summarize(_qdq_model())["quantization"]
    assert q["QuantizeLinear"] == 1 and q["DequantizeLinear"] == 2
    assert q["integer_weights"] == {"int8": {"count": 2, "params": 65}}  # WQ and the zero point
    assert q["encodings"] == 1 and q["quantized"] is True


def test_sparsity_status_detects_two_four_along_the_input_dim():
    s = summarize(_qdq_model())
    rows = {r["name"]: r for r in s["sparsity"]["sparse_initializers"]}
    assert rows["WQ"] == {"name": "WQ", "shape": [8, 8], "zeros": 0.5, "pattern": "2:4"}
    assert rows["F"] == {"name": "F", "shape": [8, 8], "zeros": 0.5}
    assert s["sparsity"]["n_m"] == {"2:4": 1}
    assert s["sparsity"]["masks"] == 1 and s["sparsity"]["mask_patterns"] == {"unstructured": 1}


def test_sizes_signature_and_markdown():
    s = summarize(_qdq_model())
    assert s["nodes"] == 5 and s["ops"] == {"DequantizeLinear": 2, "MatMul": 2, "QuantizeLinear": 1}
    assert s["params"] == 1 + 1 + 64 + 1 + 64
    assert s["bytes"] == 4 + 1 + 64 + 4 + 256
    assert s["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]
    text = to_markdown(s)
    assert "- parameters: 131 (131)" in text
    assert "| input | x | float32 | [batch, 8] |" in text
    assert "| MatMul | 2 |" in text
    assert "WQ [8, 8]: 50.0% zeros, 2:4" in text


def test_tied_transposed_copy_is_counted_once():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["e"], name="emb"),
             helper.make_node("MatMul", ["e", "W.T"], ["y"], name="head")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w.T.copy(), "W.T")],
    )
    model = Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert summarize(model)["params"] == 12
    model.graph.tensors()["W.T"].values = np.zeros((4, 3), np.float32)  # untied: both count
    assert summarize(model)["params"] == 24


def test_tiny_model_both_forms(tiny_fx, tiny_onnx):
    fx = summarize(tiny_fx)
    assert fx["form"] == "fx" and fx["ops"]["aten.linear.default"] == 15
    assert fx["params"] == tiny_fx.num_params()
    onnx_summary = summarize(tiny_onnx)
    assert onnx_summary["nodes"] == len(tiny_onnx.graph.nodes) == sum(onnx_summary["ops"].values())
    assert onnx_summary["ops"]["MatMul"] == 19  # 15 linear layers + 2 x 2 attention products
    assert abs(onnx_summary["params"] - fx["params"]) < 0.01 * fx["params"]
    assert onnx_summary["inputs"][0]["name"] == "input_ids" and onnx_summary["inputs"][0]["dtype"] == "int64"
    assert onnx_summary["quantization"]["quantized"] is False
    assert onnx_summary["sparsity"]["sparse_initializers"] == []
    assert "not quantized" in to_markdown(onnx_summary)


def test_fx_linear_weight_two_four_along_its_input_dim(tiny_fx):
    import torch

    model = tiny_fx.copy()
    weight = dict(model.fx.named_parameters())["model.layers.0.mlp.up_proj.weight"]  # [out 128, in 64]
    with torch.no_grad():
        weight.view(128, 16, 4)[:, :, 2:] = 0  # 2:4 along the input dim
    rows = summarize(model)["sparsity"]["sparse_initializers"]
    assert rows == [{"name": "model.layers.0.mlp.up_proj.weight", "shape": [128, 64], "zeros": 0.5, "pattern": "2:4"}]
    with torch.no_grad():
        weight.fill_(1.0)
        weight[:64] = 0  # half the rows: 50 % zeros along the output dim, no 2:4 along the input
    rows = summarize(model)["sparsity"]["sparse_initializers"]
    assert rows == [{"name": "model.layers.0.mlp.up_proj.weight", "shape": [128, 64], "zeros": 0.5}]
