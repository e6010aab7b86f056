"""ort-mobile backend: .ort files that run like the ONNX model, operator config, usability report."""

import json

import numpy as np
import pytest

from graphopt.errors import BackendError, OptionError, UnsupportedGraphError
from graphopt.pipeline import available_backends, export


def quantized(model, **options):
    """`model` through graphopt's quantize pass (QDQ), calibrated on its sample inputs."""
    from graphopt.pipeline import Pipeline, get_pass

    pipeline = Pipeline([get_pass("quantize")(**options)], verify=False, progress=False, log=lambda *a: None)
    return pipeline.run(model, calib=model.sample_inputs).model


@pytest.fixture(scope="module")
def tiny_qdq(tiny_onnx):
    return quantized(tiny_onnx)


def _outputs(session_or_path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(session_or_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: feeds[n] for n in names})


def test_registered_with_its_options():
    backend = available_backends()["ort-mobile"]
    assert backend.from_options({"optimization_style": "runtime"}).optimization_style == "runtime"
    with pytest.raises(OptionError, match="unknown option 'style'"):
        backend.from_options({"style": "fixed"})
    with pytest.raises(OptionError, match="optimization_style"):
        backend.from_options({"optimization_style": "eager"})


def test_float_tiny_model_ort_matches_onnx(tiny_onnx, tmp_path):
    artifact = export(tiny_onnx, "ort-mobile", tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".graphopt-manifest.json")
    assert names == ["mobile_usability.json", "mobile_usability.md", "model.ort", "ort_mobile.json",
                     "required_operators.config"]
    assert artifact.validation["passed"] and artifact.validation["max_abs_diff"] <= 1e-5
    assert not artifact.validation["exact_required"]
    # independently of validate(): a fresh session on the .ort against the fp32 model
    feeds = tiny_onnx.sample_inputs[0]
    got = _outputs(tmp_path / "out" / "model.ort", feeds)[0]
    want = tiny_onnx.run(feeds)[0]
    assert got.shape == want.shape == (2, 32, 256)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    config = (tmp_path / "out" / "required_operators.config").read_text()
    assert "MatMul" in config and "Softmax" in config
    assert "MatMul" in artifact.report["operators"]["ai.onnx"]
    usability = json.loads((tmp_path / "out" / "mobile_usability.json").read_text())
    assert set(usability["eps"]) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram", "XNNPACK"}
    assert usability["dynamic_inputs"] == ["input_ids"]
    by_op = {}
    for node in usability["nodes"]:
        by_op.setdefault(node["op"], set()).update(node["eps"])
    assert "XNNPACK" in by_op["MatMul"] and "NNAPI" in by_op["MatMul"]
    assert not by_op["CumSum"] & {"NNAPI", "XNNPACK"}  # no mobile EP takes CumSum
    assert "| NNAPI | as is |" in (tmp_path / "out" / "mobile_usability.md").read_text()


def test_runtime_style_with_type_reduction(tiny_onnx, tmp_path):
    artifact = export(tiny_onnx, "ort-mobile", tmp_path,
                      {"optimization_style": "runtime", "type_reduction": True, "usability": False})
    assert [p.name for p in artifact.files] == ["model.ort", "required_operators.config", "ort_mobile.json"]
    assert artifact.validation["max_abs_diff"] <= 1e-5
    config = (tmp_path / "required_operators.config").read_text()
    assert "{" in config  # per-op type lists
    assert "MatMul" in artifact.report["operators"]["ai.onnx"]


def test_qdq_model_is_exact(tiny_onnx, tiny_qdq, tmp_path):
    artifact = export(tiny_qdq, "ort-mobile", tmp_path / "w8a8", {"usability": False})
    assert artifact.report["qdq"] and artifact.validation["exact_required"]
    assert artifact.validation["max_abs_diff"] == 0.0
    assert "DequantizeLinear" in artifact.report["operators"]["ai.onnx"] or "com.microsoft" in artifact.report["operators"]
    with pytest.raises(BackendError, match="4-bit, which the ORT format cannot store"):
        export(quantized(tiny_onnx, weight_bits=4, weight_granularity="block", weight_block_size=32), "ort-mobile",
               tmp_path / "w4")
    assert not (tmp_path / "w4" / "model.ort").exists()


def test_a16_layers_fused_to_int8_matmulnbits_are_reported(tiny_onnx, tiny_qdq, tmp_path):
    """onnxruntime's converter turns 16-bit-activation linears into MatMulNBits (int8 activations)."""
    a16 = export(quantized(tiny_onnx, activation_bits=16), "ort-mobile", tmp_path / "w8a16", {"usability": False})
    assert "MatMulNBits" in a16.report["operators"]["com.microsoft"]
    assert "quantized to int8 at run time" in a16.report["warnings"][0]
    assert "warnings" in json.loads((tmp_path / "w8a16" / "ort_mobile.json").read_text())
    a8 = export(tiny_qdq, "ort-mobile", tmp_path / "w8a8", {"usability": False})
    assert "warnings" not in a8.report


def test_validation_catches_a_wrong_ort(tiny_onnx, tiny_qdq, tmp_path):
    """The check has teeth: a .ort of a different (quantized) model fails against the float model."""
    backend = available_backends()["ort-mobile"]()
    artifact = backend.emit(tiny_qdq, tmp_path)
    with pytest.raises(BackendError, match="outputs differ from the ONNX model"):
        backend.validate(artifact, tiny_onnx)


def test_errors_name_the_problem(tiny_fx, tiny_onnx, tmp_path):
    backend = available_backends()["ort-mobile"]()
    with pytest.raises(UnsupportedGraphError, match="ort-mobile"):
        backend.emit(tiny_fx, tmp_path)
    no_samples = tiny_onnx.replace(sample_inputs=[])
    artifact = backend.emit(no_samples, tmp_path / "a")
    found = backend.validate(artifact, no_samples)  # an ONNX file from disk: feeds from the input specs
    assert found["feeds"] == "synthesized" and found["max_abs_diff"] <= 1e-5
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "a").iterdir())


def test_never_overwrites_the_input(tiny_onnx, tmp_path):
    from graphopt.errors import UnsafePathError

    source = tmp_path / "model.ort"
    source.write_bytes(b"input")
    with pytest.raises(UnsafePathError, match="holds files graphopt did not write"):
        export(tiny_onnx.replace(source=source), "ort-mobile", tmp_path, {"usability": False})
    with pytest.raises(UnsafePathError, match="refusing to write over"):  # even with force
        export(tiny_onnx.replace(source=source), "ort-mobile", tmp_path, {"usability": False}, force=True)
    assert source.read_bytes() == b"input" and sorted(p.name for p in tmp_path.iterdir()) == ["model.ort"]


@pytest.mark.real
def test_minilm_ort_matches_onnx(minilm_onnx, tmp_path):
    artifact = export(minilm_onnx, "ort-mobile", tmp_path, {"usability": False})
    assert artifact.validation["passed"] and artifact.validation["max_abs_diff"] <= 1e-5
    assert artifact.report["bytes"] > 80_000_000  # 22.7M float parameters
