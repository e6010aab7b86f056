"""qnn backend: float ONNX + encodings + model_net.json that rebuild the QDQ model exactly; HTP report."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import cli
from graphopt.backends.qnn import check_encodings_v1, load_package, rebuild_qdq, strip_qdq
from graphopt.errors import BackendError, GraphoptError, OptionError, UnsupportedGraphError
from graphopt.ir import Model
from graphopt.pipeline import available_backends, export
from graphopt.quant.encodings import Encodings

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def ort_qdq(model, tmp_path, op_types=("MatMul",)):
    """`model` quantized by onnxruntime's quantize_static (QDQ, per-channel int8 weights, uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.items = iter(model.sample_inputs)

        def get_next(self):
            return next(self.items, None)

    onnx.save(model.to_onnx(), tmp_path / "float.onnx")
    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "qdq.onnx"), Feeds(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(op_types))
    return graphopt.load(str(tmp_path / "qdq.onnx")).replace(sample_inputs=model.sample_inputs, name=f"{model.name}-qdq")


@pytest.fixture(scope="module")
def tiny_qdq(tiny_onnx, tmp_path_factory):
    return ort_qdq(tiny_onnx, tmp_path_factory.mktemp("qdq"))


@pytest.fixture(scope="module")
def tiny_package(tiny_qdq, tmp_path_factory):
    out = tmp_path_factory.mktemp("qnn")
    return export(tiny_qdq, "qnn", out)


def _handmade(tmp_path, *, weight_bits=8, matmul_3d=False, extra_op=None) -> Model:
    """x[1, 8] -> Q/DQ (uint8) -> MatMul(W [8, 4], per channel) -> y; optional planted problems."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    code_type = {8: np.int8, 16: np.int16}[weight_bits]
    codes = rng.integers(-100, 100, size=(2, 8, 4) if matmul_3d else (8, 4)).astype(code_type)
    inits = [numpy_helper.from_array(codes, "w_q"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(4, code_type), "w_zp"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w",
                              axis=2 if matmul_3d else 1),
             helper.make_node("MatMul", ["x_dq", "w"], ["mm"], name="matmul")]
    last = "mm"
    if extra_op:
        nodes.append(helper.make_node(extra_op, [last], ["planted"], name="planted_op"))
        last = "planted"
    nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    graph = helper.make_graph(nodes, "handmade", [x], [y], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "handmade.onnx"
    onnx.save(proto, path)
    feeds = [{"x": rng.normal(size=(1, 8)).astype(np.float32)}]
    return graphopt.load(str(path)).replace(sample_inputs=feeds)


def test_registered_with_its_options():
    backend = available_backends()["qnn"]
    assert backend.from_options({"encodings_version": "0.6.1"}).encodings_version == "0.6.1"
    with pytest.raises(OptionError, match="unknown option 'version'"):
        backend.from_options({"version": "1.0.0"})
    with pytest.raises(OptionError, match="encodings_version"):
        backend.from_options({"encodings_version": "2.0"})


def test_package_rebuilds_the_qdq_model_exactly(tiny_qdq, tiny_package):
    folder = tiny_package.out_dir
    assert sorted(p.name for p in tiny_package.files) == sorted(
        ["model.onnx", "model.encodings", "model_net.json", "htp_compatibility.json", "htp_compatibility.md",
         "qnn_package.json"])
    assert tiny_package.validation["identical"] and tiny_package.validation["entries"] == 51  # 15 weights + 36 acts
    float_model, encodings, code_types, biases = load_package(folder)
    assert not [n for n in float_model.graph.nodes if n.op in QDQ_OPS]
    # stable names: every tensor the QDQ graph computes outside Q/DQ keeps its name; outputs keep theirs
    kept = {t.name for n in tiny_qdq.graph.nodes if n.op not in QDQ_OPS for t in n.outputs}
    assert kept - set(float_model.graph.tensors()) == {"logits_QuantizeLinear_Input"}  # now named 'logits'
    assert "logits" in encodings.activations
    assert [o.name for o in float_model.graph.outputs] == ["logits"]
    # weights are DequantizeLinear's values exactly
    dq = next(n for n in tiny_qdq.graph.nodes if n.op == "DequantizeLinear" and n.outputs[0].name.startswith("model.layers.1.mlp.up_proj"))
    codes, scale = dq.inputs[0].values.astype(np.int32), dq.inputs[1].values
    weight = float_model.graph.tensors()[dq.outputs[0].name].values
    assert np.array_equal(weight, codes.astype(np.float32) * scale[None, :])
    # independently of validate(): the rebuilt model against onnxruntime's QDQ model
    assert code_types["mul_126"] == "uint8" and code_types[dq.outputs[0].name] == "int8"
    feeds = tiny_qdq.sample_inputs[0]
    want = tiny_qdq.run(feeds)[0]
    assert not biases and np.array_equal(rebuild_qdq(float_model, encodings, code_types).run(feeds)[0], want)
    # without the datatypes, zero point 128 activations come back as int8: same values, other kernels
    assert 0 < np.abs(float_model.run(feeds)[0] - want).max() < 0.5  # the float model is not the QDQ model


def test_encodings_complete_and_valid(tiny_qdq, tiny_package):
    data = json.loads((tiny_package.out_dir / "model.encodings").read_text())
    assert data["version"] == "1.0.0" and check_encodings_v1(data) == []
    names = {e["name"] for e in data["activation_encodings"] + data["param_encodings"]}
    weights = {n.outputs[0].name for n in tiny_qdq.graph.nodes
               if n.op == "DequantizeLinear" and isinstance(n.inputs[0], onnx_graphsurgeon_constant())}
    activations = {n.inputs[0].name for n in tiny_qdq.graph.nodes if n.op == "QuantizeLinear"}
    activations = {"logits" if a == "logits_QuantizeLinear_Input" else a for a in activations}  # output name kept
    assert names == weights | activations and len(weights) == 15
    table = next(e for e in data["param_encodings"] if e["name"].startswith("lm_head.weight.T"))
    assert table["enc_type"] == "PER_CHANNEL" and len(table["scale"]) == 256 and table["is_sym"]
    # the schema check has teeth
    broken = json.loads(json.dumps(data))
    broken["version"] = "1.0"
    broken["param_encodings"][0]["scale"] = [1.0, 2.0]
    broken["param_encodings"][1]["enc_type"] = "PER_ROW"
    broken["activation_encodings"].append(dict(broken["activation_encodings"][0], bw=7))
    problems = "\n".join(check_encodings_v1(broken))
    assert "version" in problems and "one per scale" in problems and "PER_ROW" in problems
    assert "appears twice" in problems and "bw must be" in problems


def onnx_graphsurgeon_constant():
    import onnx_graphsurgeon as gs

    return gs.Constant


def test_model_net_json_layout(tiny_package):
    net = json.loads((tiny_package.out_dir / "model_net.json").read_text())
    tensors, nodes = net["graph"]["tensors"], net["graph"]["nodes"]
    fc = nodes["node_linear"]
    assert fc["package"] == "qti.aisw" and fc["type"] == "FullyConnected"
    assert fc["macs_per_inference"] == 2 * 32 * 64 * 64  # [2, 32, 64] x [64, 64]
    weight = tensors[fc["input_names"][1]]
    assert weight["tensor_type"] == "QNN_TENSOR_TYPE_STATIC" and weight["data_type_name"] == "QNN_DATATYPE_SFIXED_POINT_8"
    assert weight["dims"] == [64, 64] and weight["permute_order_to_src"] == [1, 0]
    assert weight["quant_params"]["encoding_name"] == "QNN_QUANTIZATION_ENCODING_AXIS_SCALE_OFFSET"
    assert weight["quant_params"]["axis_scale_offset"]["axis"] == 0  # output channels of [out, in]
    act = tensors[fc["input_names"][0]]
    assert act["data_type_name"] == "QNN_DATATYPE_UFIXED_POINT_8" and act["data_type"] == 0x0408
    assert act["quant_params"]["scale_offset"]["offset"] <= 0  # QNN offset = -zero_point
    assert tensors["input_ids"]["tensor_type"] == "QNN_TENSOR_TYPE_APP_WRITE" and tensors["input_ids"]["dims"] == [2, 32]
    assert tensors["logits"]["tensor_type"] == "QNN_TENSOR_TYPE_APP_READ" and tensors["logits"]["dims"] == [2, 32, 256]
    assert {"ElementWiseAdd", "Softmax", "MatMul", "Gather", "FullyConnected"} <= set(net["op_types"])
    assert tiny_package.report["macs_per_inference"] == sum(n["macs_per_inference"] for n in nodes.values())
    # the lowered model keeps dynamic batch/seq axes and an IsNaN in its attention mask
    findings = json.loads((tiny_package.out_dir / "htp_compatibility.json").read_text())
    rejects = {(f["rule"], f["tensor"] or nodes[f["node"]]["onnx_op"]) for f in findings if f["severity"] == "reject"}
    assert rejects == {("dynamic_shape", "input_ids"), ("unsupported_op", "IsNaN")}


def test_0_6_1_encodings(tiny_qdq, tmp_path):
    artifact = export(tiny_qdq, "qnn", tmp_path, {"encodings_version": "0.6.1"})
    data = json.loads((tmp_path / "model.encodings").read_text())
    assert data["version"] == "0.6.1" and isinstance(data["param_encodings"], dict)
    assert artifact.validation["identical"]  # channel axes resolved from the weights' shapes


def test_compatibility_lists_planted_problems(tmp_path):
    (tmp_path / "a").mkdir()
    clean = export(_handmade(tmp_path / "a"), "qnn", tmp_path / "clean")
    assert clean.validation["identical"] and clean.report["htp"]["rejects"] == 0

    (tmp_path / "b").mkdir()
    planted = _handmade(tmp_path / "b", weight_bits=16, extra_op="Hardmax")
    artifact = export(planted, "qnn", tmp_path / "planted")
    rules = {(f["rule"], f["node"]) for f in json.loads((tmp_path / "planted" / "htp_compatibility.json").read_text())}
    assert ("weight_16bit", "matmul") in rules and ("unsupported_op", "planted_op") in rules
    assert artifact.validation["identical"]  # the package is still exact; HTP is what would refuse it
    assert "| reject | weight_16bit | matmul |" in (tmp_path / "planted" / "htp_compatibility.md").read_text()

    (tmp_path / "c").mkdir()
    batched = _handmade(tmp_path / "c", matmul_3d=True)
    artifact = available_backends()["qnn"]().emit(batched, tmp_path / "batched")
    assert artifact.report["htp"]["rules"].get("per_channel_matmul") == 1
    with pytest.raises(BackendError, match="HTP would reject .* per tensor"):
        available_backends()["qnn"](fail_on_reject=True).emit(batched, tmp_path / "strict")


def test_float_model_has_nothing_to_encode(tiny_onnx, tmp_path):
    artifact = export(tiny_onnx, "qnn", tmp_path)
    assert artifact.report["encodings"] == {"activations": 0, "params": 0}
    assert artifact.validation["identical"] and artifact.validation["rebuilt_qdq_nodes"] == 0
    float_model, encodings, _ = strip_qdq(tiny_onnx)
    assert len(encodings) == 0 and float_model.num_nodes() == tiny_onnx.num_nodes()


def test_validation_catches_a_wrong_package(tiny_qdq, tiny_package, tmp_path):
    backend = available_backends()["qnn"]()
    artifact = backend.emit(tiny_qdq, tmp_path)
    data = json.loads((tmp_path / "model.encodings").read_text())
    data["activation_encodings"][3]["scale"][0] *= 1.5
    (tmp_path / "model.encodings").write_text(json.dumps(data))
    with pytest.raises(BackendError, match="rebuilt from the package differs"):
        backend.validate(artifact, tiny_qdq)
    del data["param_encodings"][0]
    (tmp_path / "model.encodings").write_text(json.dumps(data))
    with pytest.raises(BackendError, match="has no entry"):
        backend.validate(artifact, tiny_qdq)


def test_errors_name_the_problem(tiny_fx, tiny_qdq, tmp_path):
    backend = available_backends()["qnn"]()
    with pytest.raises(UnsupportedGraphError, match="qnn"):
        backend.emit(tiny_fx, tmp_path)
    lone = tiny_qdq.copy()
    q = next(n for n in lone.graph.nodes if n.op == "QuantizeLinear")
    dq = q.outputs[0].outputs[0]
    dq.inputs[0] = q.inputs[0]  # a DequantizeLinear of a float activation, no QuantizeLinear
    with pytest.raises(BackendError, match=f"DequantizeLinear '{dq.name}'"):
        backend.emit(lone, tmp_path / "lone")
    assert not (tmp_path / "lone").exists() or not any((tmp_path / "lone").iterdir())


def test_convert_with_backend_flag(tiny_qdq, tmp_path, capsys):
    onnx.save(tiny_qdq.to_onnx(), tmp_path / "qdq.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: []\nbackend:\n  name: qnn\n  encodings_version: \"0.6.1\"\n")
    assert cli.main(["convert", str(tmp_path / "qdq.onnx"), "--recipe", str(recipe), "-o", str(tmp_path / "out"),
                     "--backend", "qnn"]) == 0
    assert json.loads((tmp_path / "out" / "qnn" / "model.encodings").read_text())["version"] == "0.6.1"
    assert (tmp_path / "out" / "qnn" / "model_net.json").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: []\nbackend:\n  name: qnn\n  encodings: \"0.6.1\"\n")
    assert cli.main(["convert", str(tmp_path / "qdq.onnx"), "--recipe", str(bad), "-o", str(tmp_path / "out3")]) == 2
    assert "unknown option 'encodings'" in capsys.readouterr().err


def graphopt_qdq(model, **options):
    """`model` through graphopt's own quantize pass, calibrated on its sample inputs."""
    from graphopt.pipeline import Pipeline, get_pass

    pipeline = Pipeline([get_pass("quantize")(**options)], verify=False, progress=False, log=lambda *a: None)
    return pipeline.run(model, calib=model.sample_inputs).model


@pytest.mark.parametrize("options, bits", [
    ({"weight_bits": 4, "weight_granularity": "block", "weight_block_size": 32, "weight_symmetric": True, "embedding_bits": 8}, {"w4": 14, "w8": 1, "a8": 9}),
    ({"activation_bits": 16}, {"w8": 15, "a16": 9}),
])
def test_graphopt_quantize_pass_packages(tiny_onnx, tmp_path, options, bits):
    qdq = graphopt_qdq(tiny_onnx, **options)
    artifact = export(qdq, "qnn", tmp_path)
    assert artifact.validation["identical"] and artifact.report["bitwidths"] == bits
    data = json.loads((tmp_path / "model.encodings").read_text())
    assert check_encodings_v1(data) == []
    net = json.loads((tmp_path / "model_net.json").read_text())["graph"]["tensors"]
    if "w4" in bits:
        blocked = [e for e in data["param_encodings"] if e["enc_type"] == "PER_BLOCK"]
        assert len(blocked) == 14 and all(e["block_size"] == 32 and e["bw"] == 4 for e in blocked)
        quant = net[blocked[0]["name"]]["quant_params"]
        assert quant["encoding_name"] == "QNN_QUANTIZATION_ENCODING_BLOCK" and quant["block_encoding"]["block_size"] == 32
        assert net[blocked[0]["name"]]["data_type_name"] == "QNN_DATATYPE_SFIXED_POINT_4"
        assert artifact.report["htp"]["rules"].get("block_not_allowed") is None  # 4-bit FC blocks are HTP's LPBQ
        with pytest.raises(GraphoptError, match="PER_BLOCK cannot be written as 0.6.1"):
            available_backends()["qnn"](encodings_version="0.6.1").emit(qdq, tmp_path / "v0")
    else:
        assert net["mul_126"]["data_type_name"] == "QNN_DATATYPE_UFIXED_POINT_16"


@pytest.mark.real
def test_minilm_package_is_exact(minilm_onnx, tmp_path):
    artifact = export(graphopt_qdq(minilm_onnx), "qnn", tmp_path)
    assert artifact.validation["identical"] and artifact.validation["entries"] == 63  # 39 weights + 24 activations
    assert artifact.report["qnn_ops"]["FullyConnected"] == 36 and artifact.report["qnn_ops"]["LayerNorm"] == 13
    assert artifact.report["macs_per_inference"] > 1e9  # 4 x 64 tokens through 21M linear weights


def test_quantized_biases_come_back(tmp_path):
    """int32 biases (scale s_x·s_w) get no encoding; model_net.json marks them SFIXED_POINT_32 and
    the rebuild derives them again, exactly."""
    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="bias")]
    proto = helper.make_model(helper.make_graph(nodes, "fc", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(proto, tmp_path / "fc.onnx")
    model = graphopt.load(str(tmp_path / "fc.onnx")).replace(
        sample_inputs=[{"x": rng.normal(size=(1, 8)).astype(np.float32)} for _ in range(2)])
    qdq = graphopt_qdq(model, quantize_bias=True)
    assert any(n.op == "DequantizeLinear" and n.outputs[0].name == "b" for n in qdq.graph.nodes)
    artifact = export(qdq, "qnn", tmp_path / "qnn")
    assert artifact.validation["identical"] and artifact.validation["batches"] == 2
    net = json.loads((tmp_path / "qnn" / "model_net.json").read_text())["graph"]["tensors"]
    assert net["b"]["data_type_name"] == "QNN_DATATYPE_SFIXED_POINT_32"
    assert "b" not in Encodings.read(tmp_path / "qnn" / "model.encodings")
