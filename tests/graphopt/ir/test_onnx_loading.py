"""load_onnx as a reading boundary (issue 18): every tensor checked wherever it sits, external data
confined and sized before it is read, invalid graphs and bad metadata refused at load, by name."""

import json
import os
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import GraphoptError, ModelLoadError, UnsafePathError
from graphopt.ir import Model
from graphopt.ir.onnx_files import load_onnx, referenced_files

OPSET = [helper.make_opsetid("", 21)]
X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])


def _model(nodes, inputs=(X,), outputs=(Y,), initializer=(), **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializer), **kwargs)
    return helper.make_model(graph, opset_imports=OPSET)


def _external(tensor: TensorProto, location: str, offset: int = 0, length: int | None = None) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = [("location", location), ("offset", str(offset))] + ([("length", str(length))] if length is not None else [])
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _constant_model(tensor: TensorProto) -> onnx.ModelProto:
    """y = x + c, with c a Constant node's value attribute."""
    return _model([helper.make_node("Constant", [], ["c"], name="const_c", value=tensor),
                   helper.make_node("Add", ["x", "c"], ["y"], name="add")])


def _if_model(then_init: TensorProto) -> onnx.ModelProto:
    """y = If(cond) then (x + init inside the branch) else x."""
    then = helper.make_graph([helper.make_node("Add", ["x", then_init.name], ["t"], name="then_add")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])], initializer=[then_init])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="else_id")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    node = helper.make_node("If", ["cond"], ["y"], name="if0", then_branch=then, else_branch=other)
    return _model([node], inputs=(cond, X))


def _save(model: onnx.ModelProto, folder, name="model.onnx"):
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def _refused(path, error=ModelLoadError, *words):
    """load_onnx refuses `path` with `error`, naming the file and every word; nothing is written."""
    before = sorted(os.listdir(path.parent))
    with pytest.raises(error) as info:
        load_onnx(path)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message
    assert sorted(os.listdir(path.parent)) == before
    return message


def _three(name="w", values=(1.0, 2.0, 3.0)) -> TensorProto:
    return numpy_helper.from_array(np.array(values, np.float32), name)


# ------------------------------------------------------------------ tensors wherever they sit
def test_constant_attribute_inline_with_wrong_byte_count_is_refused(tmp_path):
    tensor = _three("c")
    tensor.raw_data = tensor.raw_data[:8]  # 2 of 3 floats
    _refused(_save(_constant_model(tensor), tmp_path), ModelLoadError, "node 'const_c' attribute 'value'", "8 bytes")


def test_constant_attribute_typed_field_count_is_checked(tmp_path):
    tensor = helper.make_tensor("c", TensorProto.FLOAT, [2], [1.0, 2.0])
    tensor.dims[0] = 3  # float_data of 2 for shape [3]
    _refused(_save(_constant_model(tensor), tmp_path), ModelLoadError, "const_c", "float_data")


def test_constant_attribute_external_data_is_confined_and_sized(tmp_path):
    (tmp_path / "c.bin").write_bytes(np.arange(2, dtype=np.float32).tobytes())  # 8 bytes, 12 needed
    _refused(_save(_constant_model(_external(_three("c"), "c.bin")), tmp_path), ModelLoadError, "const_c",
             "past its end")
    _refused(_save(_constant_model(_external(_three("c"), "../c.bin")), tmp_path), UnsafePathError, "const_c",
             "leaves the model's folder")
    (tmp_path / "c.bin").write_bytes(np.array([1, 2, 3], np.float32).tobytes())
    proto = load_onnx(_save(_constant_model(_external(_three("c"), "c.bin")), tmp_path))
    out = Model.from_onnx(proto).run({"x": np.zeros(3, np.float32)})[0]
    np.testing.assert_array_equal(out, [1, 2, 3])


def test_subgraph_initializer_with_wrong_byte_count_is_refused(tmp_path):
    inner = _three("inner")
    inner.raw_data = inner.raw_data + b"\0" * 4
    _refused(_save(_if_model(inner), tmp_path), ModelLoadError, "node 'if0' attribute 'then_branch'",
             "initializer 'inner'")


def test_subgraph_external_data_escaping_is_refused_not_a_validation_traceback(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.ones(3, np.float32).tobytes())
    folder = tmp_path / "m"
    folder.mkdir()
    model = _if_model(_external(_three("inner"), "../outside.bin"))
    _refused(_save(model, folder), UnsafePathError, "then_branch", "'inner'", "../outside.bin")
    (folder / "link.bin").symlink_to(outside)
    _refused(_save(_if_model(_external(_three("inner"), "link.bin")), folder), UnsafePathError, "outside the model's folder")


def test_function_body_tensors_are_checked(tmp_path):
    bad = _three("fc")
    bad.raw_data = b"\0"
    body = [helper.make_node("Constant", [], ["k"], name="fconst", value=bad),
            helper.make_node("Add", ["a", "k"], ["b"], name="fadd")]
    function = helper.make_function("local", "AddK", ["a"], ["b"], body, OPSET)
    graph = helper.make_graph([helper.make_node("AddK", ["x"], ["y"], domain="local", name="call")], "g", [X], [Y])
    model = helper.make_model(graph, opset_imports=OPSET + [helper.make_opsetid("local", 1)], functions=[function])
    _refused(_save(model, tmp_path), ModelLoadError, "function 'AddK'", "fconst")


def test_hard_linked_external_data_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(3, np.float32).tobytes())
    folder = tmp_path / "m"
    folder.mkdir()
    os.link(secret, folder / "w.bin")
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], initializer=[_external(_three(), "w.bin")])
    _refused(_save(model, folder), UnsafePathError, "'w'", "hard links")


def test_folder_used_as_external_data_is_named_a_folder(tmp_path):
    (tmp_path / "weights").mkdir()
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], initializer=[_external(_three(), "weights")])
    _refused(_save(model, tmp_path), ModelLoadError, "'weights' is a folder")


def test_length_and_offset_are_strict_integers_matching_the_shape(tmp_path):
    (tmp_path / "w.bin").write_bytes(np.ones(16, np.float32).tobytes())
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], initializer=[_external(_three(), "w.bin", length=16)])
    _refused(_save(model, tmp_path), ModelLoadError, "length 16 bytes", "needs 12")
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], initializer=[_external(_three(), "w.bin")])
    model.graph.initializer[0].external_data[1].value = "-4"
    _refused(_save(model, tmp_path), ModelLoadError, "offset must be a non-negative integer")


def test_without_a_length_only_the_tensors_bytes_are_read(tmp_path):
    """The issue's case: no `length` made onnx read the whole (large) file before the size check."""
    data = tmp_path / "w.bin"
    with open(data, "wb") as fh:
        fh.write(np.array([4, 5, 6], np.float32).tobytes())
        fh.truncate(256 << 20)  # 256 MiB apparent, a few KB on disk
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], initializer=[_external(_three(), "w.bin")])
    tracemalloc.start()
    proto = load_onnx(_save(model, tmp_path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak
    np.testing.assert_array_equal(numpy_helper.to_array(proto.graph.initializer[0]), [4, 5, 6])


def test_sparse_file_claiming_a_gibibyte_is_refused_before_reading(tmp_path):
    data = tmp_path / "w.bin"
    with open(data, "wb") as fh:
        fh.write(b"\1" * 8192)
        fh.truncate(1 << 30)  # 8 KB on disk, 1 GiB apparent
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 28])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1 << 28])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1 << 28])
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], inputs=(x,), outputs=(y,),
                   initializer=[_external(weight, "w.bin", length=1 << 30)])
    tracemalloc.start()
    _refused(_save(model, tmp_path), ModelLoadError, "sparse file", "w.bin")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_sparse_initializer_is_checked_and_made_dense(tmp_path):
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "s")
    indices = numpy_helper.from_array(np.array([0, 2], np.int64), "s_idx")
    sparse = helper.make_sparse_tensor(values, indices, [3])
    model = _model([helper.make_node("Add", ["x", "s"], ["y"])], sparse_initializer=[sparse])
    proto = load_onnx(_save(model, tmp_path))
    assert not proto.graph.sparse_initializer
    out = Model.from_onnx(proto).run({"x": np.zeros(3, np.float32)})[0]
    np.testing.assert_array_equal(out, [1, 0, 2])  # onnx-graphsurgeon alone reads zeros here
    bad = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 7], np.int64), "i"), [3])
    model = _model([helper.make_node("Add", ["x", "s"], ["y"])], sparse_initializer=[bad])
    _refused(_save(model, tmp_path), ModelLoadError, "sparse initializer 's'", "outside")
    huge = helper.make_sparse_tensor(values, indices, [1 << 40])
    model = _model([helper.make_node("Add", ["x", "s"], ["y"])], sparse_initializer=[huge])
    _refused(_save(model, tmp_path), ModelLoadError, "sparse initializer 's'", "dense form")


def test_sparse_initializer_external_values_are_confined(tmp_path):
    values = _external(numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "s"), "/etc/passwd")
    indices = numpy_helper.from_array(np.array([0, 2], np.int64), "s_idx")
    model = _model([helper.make_node("Add", ["x", "s"], ["y"])],
                   sparse_initializer=[helper.make_sparse_tensor(values, indices, [3])])
    _refused(_save(model, tmp_path), UnsafePathError, "sparse initializer 's' values", "/etc/passwd")



def test_referenced_files_name_external_data_wherever_it_sits(tmp_path):
    """Writers protect these files as inputs: a Constant node's data, a subgraph's, a function's and a
    sparse initializer's count, not only the graph's initializers (convert once replaced the
    `model.onnx.data` a Constant node read)."""
    function = helper.make_function("local", "AddK", ["a"], ["b"], [
        helper.make_node("Constant", [], ["k"], name="fconst", value=_external(_three("fc"), "f.bin")),
        helper.make_node("Add", ["a", "k"], ["b"], name="fadd")], OPSET)
    sparse = helper.make_sparse_tensor(_external(numpy_helper.from_array(np.ones(2, np.float32), "s"), "s.bin"),
                                       numpy_helper.from_array(np.array([0, 2], np.int64), "s_idx"), [3])
    then = helper.make_graph([helper.make_node("Add", ["x", "inner"], ["t"], name="then_add")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])],
                             initializer=[_external(_three("inner"), "sub.bin")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="else_id")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])])
    nodes = [helper.make_node("Constant", [], ["c"], name="const_c", value=_external(_three("c"), "c.bin")),
             helper.make_node("If", ["cond"], ["i"], name="if0", then_branch=then, else_branch=other),
             helper.make_node("AddK", ["i"], ["j"], domain="local", name="call"),
             helper.make_node("Add", ["j", "c"], ["k"], name="add_c"),
             helper.make_node("Add", ["k", "s"], ["y"], name="add_s")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), X], [Y],
                              initializer=[_external(_three("w"), "w.bin")], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=OPSET + [helper.make_opsetid("local", 1)], functions=[function])
    found = referenced_files(_save(model, tmp_path))
    assert [p.name for p in found] == ["c.bin", "f.bin", "s.bin", "sub.bin", "w.bin"]
    assert all(p.parent == tmp_path.resolve() for p in found)

# ------------------------------------------------------------------------------ the graph
def test_duplicated_output_is_refused_naming_both(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="a"), helper.make_node("Neg", ["x"], ["y"], name="b")])
    _refused(_save(model, tmp_path), ModelLoadError, "node 'b' makes tensor 'y'", "node 'a'")
    listed = _model([helper.make_node("Relu", ["x"], ["y"], name="a")], outputs=(Y, Y))
    _refused(_save(listed, tmp_path), ModelLoadError, "graph output 'y' is listed twice")


def test_dangling_input_is_refused(tmp_path):
    model = _model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")])
    _refused(_save(model, tmp_path), ModelLoadError, "node 'add' reads 'ghost'")


def test_output_no_node_makes_is_refused(tmp_path):
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="a")], outputs=(Y, z))
    _refused(_save(model, tmp_path), ModelLoadError, "graph output 'z' is made by no node")


def test_cycle_is_refused(tmp_path):
    model = _model([helper.make_node("Add", ["x", "b"], ["a"], name="first"),
                    helper.make_node("Relu", ["a"], ["b"], name="second"),
                    helper.make_node("Identity", ["b"], ["y"], name="out")])
    _refused(_save(model, tmp_path), ModelLoadError, "cycle")


def test_subgraph_reading_an_outer_name_is_fine_and_a_missing_one_is_not(tmp_path):
    load_onnx(_save(_if_model(_three("inner")), tmp_path))  # the branch reads the outer 'x'
    then = helper.make_graph([helper.make_node("Add", ["nowhere", "x"], ["t"], name="then_add")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    model = _model([helper.make_node("If", ["cond"], ["y"], name="if0", then_branch=then, else_branch=other)],
                   inputs=(cond, X))
    _refused(_save(model, tmp_path), ModelLoadError, "then_branch", "reads 'nowhere'")


# --------------------------------------------------------------------------- graphopt.meta
@pytest.mark.parametrize("value, words", [
    ("{not json", ["not valid JSON"]),
    ("[" * 5000 + "]" * 5000, ["nested more than"]),
    (json.dumps({"encodings": [1, 2]}), ["'encodings' must be an object"]),
    (json.dumps({"encodings": {"x": {"bw": 8, "is_sym": "false", "scale": [0.1], "offset": [0]}}}),
     ["entry 'x'", "'is_sym' must be true or false"]),
    (json.dumps({"pruning": {"a": 1}}), ["'pruning' must be a list"]),
    ('{"masks": {}, "masks": {}}', ["'masks' is given twice"]),
])
def test_malformed_graphopt_meta_is_a_clear_error(tmp_path, value, words):
    model = _model([helper.make_node("Relu", ["x"], ["y"])])
    model.metadata_props.add(key="graphopt.meta", value=value)
    _refused(_save(model, tmp_path), ModelLoadError, "metadata 'graphopt.meta'", *words)


def test_unknown_element_type_and_negative_dims_are_refused(tmp_path):
    tensor = _three()
    tensor.data_type = 99
    _refused(_save(_model([helper.make_node("Add", ["x", "w"], ["y"])], initializer=[tensor]), tmp_path),
             ModelLoadError, "initializer 'w'", "unknown element type 99")
    tensor = _three()
    tensor.dims[0] = -3
    _refused(_save(_model([helper.make_node("Add", ["x", "w"], ["y"])], initializer=[tensor]), tmp_path),
             ModelLoadError, "negative dimension")


def test_every_model_graphopt_writes_loads_back(tiny_onnx, tmp_path):
    path = tiny_onnx.save(tmp_path / "tiny.onnx")
    back = Model.from_onnx(load_onnx(path))
    assert back.num_params() == tiny_onnx.num_params()
    assert issubclass(UnsafePathError, GraphoptError)


def test_names_that_are_not_utf8_are_refused(tmp_path):
    data = _model([helper.make_node("Relu", ["x"], ["y"], name="abc")]).SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(data.replace(b"abc", b"a\xffc"))
    _refused(path, ModelLoadError, "NodeProto.name is not UTF-8")


def test_graph_output_without_a_tensor_type_is_refused(tmp_path):
    untyped = helper.make_empty_tensor_value_info("y")
    _refused(_save(_model([helper.make_node("Relu", ["x"], ["y"])], outputs=(untyped,)), tmp_path), ModelLoadError,
             "graph output 'y' is not a tensor of a known element type")
