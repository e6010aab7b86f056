"""The README's Python block runs as written, on an ONNX file of the user's and their feeds."""

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

README = Path(__file__).resolve().parent.parent / "README.md"


def _users_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Identity", ["r"], ["i"]), helper.make_node("MatMul", ["i", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "users-model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_the_python_block_quantizes_a_users_onnx_file(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python block"
    monkeypatch.chdir(tmp_path)
    _users_model(tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32))
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = tmp_path / "out" / "model-w8a8.onnx"
    ops = {node.op_type for node in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops and "Identity" not in ops
    printed = capsys.readouterr().out
    assert "quantize" in printed and "cleanup" in printed
