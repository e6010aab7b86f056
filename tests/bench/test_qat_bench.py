"""bench/qat.py on the tiny model: PTQ and QAT rows, the temperature in the row, 16-bit shares, versions recorded."""

import json

import pytest
from bench_scripts import load_bench

bench_qat = load_bench("qat")


def test_ptq_and_qat_rows_fold_to_models_near_fp32(tmp_path, capsys):
    out = tmp_path / "qat.json"
    assert bench_qat.main(["--model", "sample:tiny-llama", "--rows", "ptq", "qat-kd", "--steps", "3",
                           "--temperature", "1", "--calib", "2", "--train-windows", "2", "--windows", "2",
                           "--length", "32", "--threads", "1", "--int16-inputs", "*.mlp.down_proj.weight",
                           "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["fp32", "PTQ W8A8 static (quantize)", "QAT (KD, T=1, 3 steps, lr 1e-05) + fold_encodings"]
    # the 16-bit points both ways: of the 9 activation points, of all 24 (15 weights too)
    assert [r.get("int16") for r in data["rows"]] == [None, "0/9 act, 0/24 pts", "2/9 act, 2/24 pts"]
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


def test_generated_windows_join_the_training_text(tmp_path):
    out, generated = tmp_path / "qat.json", tmp_path / "generated.npy"
    common = ["--model", "sample:tiny-llama", "--generated", "3", "--prompt-tokens", "8", "--calib", "2",
              "--train-windows", "2", "--windows", "2", "--length", "32", "--threads", "1",
              "--generated-file", str(generated)]
    assert bench_qat.main(common + ["--generate-only"]) == 0 and generated.is_file()
    assert bench_qat.main(common + ["--rows", "qat-kd", "--steps", "2", "--weight-scale-lr", "0", "--shuffle", "1",
                                    "--no-teacher-cache", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"][1]["name"] == ("QAT (KD, weight grids fixed, shuffled (1), +3 generated, 2 steps, lr 1e-05) "
                                       "+ fold_encodings")
    assert data["rows"][1]["overlap@1"] >= 0.9 and data["protocol"]["train"]["generated"] == 3
    assert bench_qat.main(common[:2] + ["--generated", "4"] + common[4:] + ["--rows", "qat-kd"]) == 2  # file holds 3
