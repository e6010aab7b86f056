"""bench/qat_budget.py on the tiny model: one row per group of quantizers switched on."""

import json

from bench_scripts import load_bench

bench_qat_budget = load_bench("qat_budget")


def test_each_group_of_quantizers_is_measured_on_its_own(tmp_path, capsys):
    out = tmp_path / "budget.json"
    assert bench_qat_budget.main(["--model", "sample:tiny-llama", "--windows", "2", "--length", "32",
                                  "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows)[:3] == ["none (fp32)", "all", "weights only"] and len(rows) == 8
    fp32 = rows["none (fp32)"]["ppl"]
    # switched on, quantizers change the output; switched off (the fp32 row), nothing does
    assert abs(rows["all"]["ppl"] / fp32 - 1) > 1e-5 and abs(rows["weights only"]["ppl"] / fp32 - 1) > 1e-6
    assert rows["all"]["ppl"] != rows["activations only"]["ppl"]
    assert all(0.8 <= r["overlap@1"] <= 1.0 for name, r in rows.items() if name != "none (fp32)")
    assert "| embedding table only |" in capsys.readouterr().out
