"""samples/qat.py runs end to end (tiny model): encodings file, static QDQ model, fidelity figures."""

import argparse
import importlib.util
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sample_qat", ROOT / "samples" / "qat.py")
sample_qat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_qat)


def _args(out: Path, lr: float) -> argparse.Namespace:
    return argparse.Namespace(model="sample:tiny-llama", steps=3, batch=2, lr=lr, device="cpu", windows=2, length=32,
                              int16_inputs=["*.mlp.down_proj.weight"], out=out)


def _faithful(figures: dict) -> bool:
    """SQNR and ppl, not only overlap@1: the tiny model's top-1 can be trivial."""
    return figures["sqnr_db"] > 38 and abs(figures["ppl_qat"] / figures["ppl_float"] - 1) < 0.01  # measured: 42.5 dB, -0.1 %


def test_tiny_llama_qat_writes_encodings_and_a_static_qdq_model_near_the_float_one(tmp_path, capsys):
    assert sample_qat.main(["--model", "sample:tiny-llama", "--steps", "3", "--windows", "2", "--length", "32",
                            "--int16-inputs", "*.mlp.down_proj.weight", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "tiny-llama-w8a8.encodings").is_file()
    ops = {n.op_type for n in onnx.load(tmp_path / "tiny-llama-w8a8-qat.onnx", load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    out = capsys.readouterr().out
    # rotate adds the final-norm gain matrix, a linear whose weight is 16-bit: 10 inputs, 16 weights
    assert "16-bit points: 2 of 10 activation points, 3 of 26 points with the weights" in out
    sqnr = float(out.split("logits SQNR ")[1].split(" dB")[0])
    ppl_float, ppl_qat = (float(x.split()[0]) for x in out.split("ppl ")[1].split(" -> "))
    assert _faithful({"sqnr_db": sqnr, "ppl_float": ppl_float, "ppl_qat": ppl_qat}), out


def test_a_wrecked_training_run_fails_the_same_check(tmp_path):
    """A learning rate that destroys the weights: the fidelity check above must catch it."""
    assert not _faithful(sample_qat.run(_args(tmp_path, lr=1.0)))
