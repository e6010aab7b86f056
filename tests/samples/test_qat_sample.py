"""samples/qat.py runs end to end (tiny model): encodings file, static QDQ model, fidelity line."""

import importlib.util
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sample_qat", ROOT / "samples" / "qat.py")
sample_qat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_qat)


def test_tiny_llama_qat_writes_encodings_and_a_static_qdq_model(tmp_path, capsys):
    assert sample_qat.main(["--model", "sample:tiny-llama", "--steps", "3", "--windows", "2", "--length", "32",
                            "--int16-inputs", "*.mlp.down_proj.weight", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "tiny-llama-w8a8.encodings").is_file()
    ops = {n.op_type for n in onnx.load(tmp_path / "tiny-llama-w8a8-qat.onnx", load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    out = capsys.readouterr().out
    # rotate adds the final-norm gain matrix, a linear whose weight is 16-bit: 10 inputs, 16 weights
    assert "16-bit points: 2 of 10 activation points, 3 of 26 points with the weights" in out
    overlap = float(out.split("overlap@1 ")[1].split(";")[0])
    assert overlap >= 0.9, out  # 8-bit W8A8 of the tiny model agrees with its float logits
