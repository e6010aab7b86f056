"""Safe ONNX I/O: external data must stay beside the model, corrupt files fail clearly, saves are atomic."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import GraphoptError, ModelLoadError, UnsafePathError
from graphopt.files.writing import atomic_write_text
from graphopt.ir import Model, onnx_files
from graphopt.ir.onnx_files import load_onnx, save_onnx
from graphopt.ir.runtime import ort_session


def small_model(weight: np.ndarray | None = None) -> onnx.ModelProto:
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) if weight is None else weight
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def with_external_location(location: str) -> onnx.ModelProto:
    """A model whose weight 'W' claims to live in `location`."""
    model = small_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    path = tmp_path / "model.onnx"
    path.write_bytes(with_external_location(location).SerializeToString())
    with pytest.raises(UnsafePathError) as info:
        load_onnx(path)
    message = str(info.value)
    assert location in message and "'W'" in message and str(path) in message


def test_external_data_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 48)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").symlink_to(outside)
    (folder / "model.onnx").write_bytes(with_external_location("weights.bin").SerializeToString())
    with pytest.raises(UnsafePathError, match="outside the model's folder"):
        load_onnx(folder / "model.onnx")


def test_external_data_beside_the_model_loads(tmp_path):
    (tmp_path / "weights.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    (tmp_path / "model.onnx").write_bytes(with_external_location("weights.bin").SerializeToString())
    loaded = load_onnx(tmp_path / "model.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]).ravel(), np.arange(12))


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file_names_the_file(tmp_path, keep):
    data = small_model(np.ones((64, 64), np.float32)).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="cut.onnx"):
        load_onnx(path)


def test_garbage_and_missing_files_name_the_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(os.urandom(256))
    with pytest.raises(ModelLoadError, match="junk.onnx"):
        load_onnx(path)
    with pytest.raises(ModelLoadError, match="absent.onnx"):
        load_onnx(tmp_path / "absent.onnx")


def test_save_refuses_to_overwrite_the_source(tmp_path):
    path = tmp_path / "model.onnx"
    save_onnx(small_model(), path)
    model = Model.from_onnx(load_onnx(path), source=path)
    before = path.read_bytes()
    with pytest.raises(UnsafePathError, match="refusing to write over"):
        model.save(path)
    with pytest.raises(UnsafePathError):
        model.save(tmp_path / "." / "model.onnx")  # same file under another spelling
    assert path.read_bytes() == before
    model.save(tmp_path / "copy.onnx")
    assert (tmp_path / "copy.onnx").is_file()


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    save_onnx(small_model(), path)
    before = path.read_bytes()

    def crash(model, target, *args, **kwargs):
        with open(target, "wb") as fh:
            fh.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", crash)
    with pytest.raises(GraphoptError, match=r"cannot write: disk full"):  # one line naming the folder
        save_onnx(small_model(np.zeros((3, 4), np.float32)), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no staging left behind


def test_large_models_keep_weights_beside_them(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 4 * 1024)  # "large" = over 1 kB here
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    path = save_onnx(small_model(weight), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size == weight.nbytes
    assert path.stat().st_size < 1024
    stored = onnx.load(str(path), load_external_data=False).graph.initializer[0]
    assert {e.key: e.value for e in stored.external_data}["location"] == "big.onnx.data"
    loaded = load_onnx(path)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight)

    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 2**31 - 1)  # a small save removes nothing it did not write
    save_onnx(small_model(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size == weight.nbytes
    assert not onnx.load(str(path), load_external_data=False).graph.initializer[0].external_data



def test_external_weights_are_mapped_not_read_and_written_back_unchanged(tmp_path, monkeypatch):
    """Large models in bounded memory: an external weight is a read-only view of its file (no copy in
    the message or in numpy) that the model runs on and writes back byte for byte."""
    from graphopt.files import mapping
    from graphopt.ir.onnx_files import load_onnx_mapped

    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(small_model(weight), str(src), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    proto, arrays = load_onnx_mapped(src)
    array = arrays["W"]
    assert proto.graph.initializer[0].data_location == TensorProto.EXTERNAL  # no copy in the message
    assert not array.flags.writeable and not array.flags.owndata
    file, offset = mapping.source(array)
    assert file == (tmp_path / "in" / "m.onnx.data").resolve() and offset == 0
    np.testing.assert_array_equal(array, weight)
    model = Model.from_onnx(proto, weights=arrays, source=src)
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(model.run({"x": x})[0], x @ weight, rtol=1e-5)
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 1024)  # written as a large model: weights streamed
    written = model.write(tmp_path / "model.onnx")
    assert [p.name for p in written] == ["model.onnx", "model.onnx.data"]
    np.testing.assert_array_equal(numpy_helper.to_array(load_onnx(tmp_path / "model.onnx").graph.initializer[0]),
                                  weight)

def test_atomic_write_text(tmp_path):
    target = atomic_write_text(tmp_path / "sub" / "r.md", "hello")
    assert target.read_text() == "hello" and sorted(os.listdir(tmp_path / "sub")) == ["r.md"]


def test_written_files_get_ordinary_permissions(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 4 * 1024)
    save_onnx(small_model(np.ones((64, 64), np.float32)), tmp_path / "m.onnx")
    atomic_write_text(tmp_path / "r.md", "x")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("m.onnx", "m.onnx.data", "r.md"):  # temp files start at 0o600; others must read them
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_ort_session_leaves_the_message_unless_it_may_consume_it():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.ir.runtime import ort_session

    weight = np.arange(4096, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              initializer=[numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    before = model.SerializeToString()
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(ort_session(model).run(None, {"x": x})[0], x @ weight)
    assert model.SerializeToString() == before
    session = ort_session(model, consume=True)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight)  # the weights live on in the session


def _sixteen_bit_activation_matmul(k: int = 256, n: int = 64, x_scale: float = 1e-3):
    """x -> Q/DQ int16 -> MatMul with a per-channel uint8 DQ'd weight: a W8A16 linear layer."""
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, (k, n), dtype=np.uint8)
    w_scale = rng.random(n).astype(np.float32) * 0.01 + 0.001
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(w_scale, "w_s"),
             numpy_helper.from_array(np.full(n, 128, np.uint8), "w_z"),
             numpy_helper.from_array(np.array(x_scale, np.float32), "x_s"),
             numpy_helper.from_array(np.array(0, np.int16), "x_z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    graph = helper.make_graph(nodes, "w8a16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = rng.standard_normal((4, k)).astype(np.float32) * 5
    x_dq = np.clip(np.rint(x / x_scale), -32768, 32767) * x_scale
    return model, x, x_dq.astype(np.float64) @ ((w.astype(np.float64) - 128) * w_scale)


def test_session_config_keeps_16_bit_activations_out_of_int8_kernels():
    # onnxruntime (1.32) fuses DQ -> MatMul into MatMulNBits at accuracy level 4 by default, which
    # quantizes the 16-bit activation to int8 on the fly; level 1 computes in float
    model, x, reference = _sixteen_bit_activation_matmul()
    error = {}
    for label, config in (("default", None), ("float", {"session.qdq_matmulnbits_accuracy_level": "1"})):
        y = ort_session(model, config=config).run(None, {"x": x})[0]
        error[label] = float(np.abs(y - reference).max() / np.abs(reference).max())
    assert error["float"] < 1e-5
    assert error["default"] > 1e-3, "onnxruntime no longer computes fused W8A16 MatMuls in int8: update bench/RESULTS.md"
