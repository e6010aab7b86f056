"""bench/qat.py on the tiny model: PTQ and QAT rows, the temperature in the row, versions recorded."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_qat", ROOT / "bench" / "qat.py")
bench_qat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_qat)


def test_ptq_and_qat_rows_fold_to_models_near_fp32(tmp_path, capsys):
    out = tmp_path / "qat.json"
    assert bench_qat.main(["--model", "sample:tiny-llama", "--rows", "ptq", "qat-kd", "--steps", "3",
                           "--temperature", "1", "--calib", "2", "--train-windows", "2", "--windows", "2",
                           "--length", "32", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["fp32", "PTQ W8A8 static (quantize)", "QAT (KD, T=1, 3 steps, lr 1e-05) + fold_encodings"]
    ptq, folded = data["rows"][1], data["rows"][2]
    # 8-bit everything on a tiny model: a broken fold or encodings export drops far below these
    assert ptq["overlap@1"] >= 0.9 and folded["overlap@1"] >= 0.9
    assert 0.97 < folded["ppl_ratio"] < 1.03 and folded["train_steps"] == 3
    assert data["protocol"]["train"]["temperature"] == 1.0
    assert data["machine"]["versions"]["onnxruntime"]
    assert "| QAT (KD, T=1" in capsys.readouterr().out


def test_reverse_kl_row_from_gptq_weights_with_validation(tmp_path):
    out = tmp_path / "qat.json"
    assert bench_qat.main(["--model", "sample:tiny-llama", "--rows", "ptq", "qat-rkl", "--steps", "2",
                           "--weight-rounding", "gptq", "--validation", "1", "--calib", "2", "--train-windows", "3",
                           "--windows", "2", "--length", "32", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["fp32", "PTQ W8A8 static (quantize, GPTQ)",
                     "QAT (reverse KL, GPTQ start, 2 steps, lr 1e-05) + fold_encodings"]
    folded = data["rows"][2]
    assert folded["overlap@1"] >= 0.9 and [step for step, _ in folded["validation"]] == [0, 1, 2]
    assert folded["best_step"] in (0, 1, 2) and data["protocol"]["weight_rounding"] == "gptq"
    with pytest.raises(SystemExit):  # nothing left to train on
        bench_qat.main(["--model", "sample:tiny-llama", "--validation", "3", "--train-windows", "3"])
