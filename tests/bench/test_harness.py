"""The bench harness: the suites and protocol load, a tiny-model suite runs end to end into the
result schema, and bench/RESULTS.md is what the results generate."""

import dataclasses
import json

import numpy as np
import pytest

from bench.__main__ import main
from bench.build import Builder
from bench.context import Context
from bench.report import render, render_suite
from bench.runner import SCHEMA, load_results, run_suite, write_result
from bench.spec import ROOT, SuiteError, load_protocol, load_suites, parse_suites
from graphopt.recipe import load_recipe, parse_recipe


@pytest.fixture(scope="module")
def protocol():
    # a second corpus (the calibration split, scored as evaluation text) exercises issue 20's two-corpus columns
    second = {"source": "sample:pydoc-topics", "calibration_split": "eval", "evaluation_split": "calib"}
    return load_protocol().replace(
        corpora={"pydoc-calib": second}, evaluation={"windows": 2, "length": 32, "corpora": ["pydoc", "pydoc-calib"]},
        calibration={"windows": 2, "length": 32},
        latency={"seq": 32, "repeats": 2, "warmup": 1, "paired_rounds": 2}, training={"windows": 4, "length": 32})


W8A8 = {"quantize": {"weight_bits": 8, "activation_bits": 8}}
TINY = {"tiny": {"title": "Tiny suite", "about": "The tiny Llama through every kind of row.", "tables": [{
    "name": "lm", "title": "tiny Llama", "model": "tiny-llama", "measure": "lm", "about": "What the rows show.",
    "columns": ["ppl", "ppl_ratio", "overlap@1", "sqnr_db", "bytes", "int16", "overlap@1 vs w8a8", "torch_overlap@1"],
    "ratios": ["ppl", "bytes"], "stats": {"int16": "fake_quantize.int16_share"}, "options": {"torch_columns": True},
    "rows": [
        {"name": "fp32", "build": "fp32", "reference": True},
        {"name": "cleanup", "build": {"passes": ["cleanup"]}},
        {"name": "w8a8", "build": {"passes": [W8A8]}},
        {"name": "w4a8", "build": {"passes": [{"quantize": {"weight_bits": 4, "activation_bits": 8}}]}},
        {"name": "ort-dynamic", "build": {"peer": {"name": "ort-quantize-dynamic"}}},
        {"name": "absent", "build": {"peer": {"name": "ort-quantize-dynamic"}}, "requires": "no_such_package"},
        {"name": "w8a8 npu-sim", "build": {"passes": [W8A8]}, "runtime": "npu-sim", "against": ["fp32", "w8a8"]},
        {"name": "qat", "build": {"qat": {"fake_quantize": {"weight_bits": 8, "activation_bits": 8,
                                                            "int16_inputs": ["*.mlp.down_proj.weight"]},
                                          "train": {"steps": 2, "lr": 1e-5}}}},
    ],
    "targets": [{"row": "w8a8", "column": "sqnr_db", "min": 30}, {"row": "w4a8", "column": "sqnr_db", "min": 30}],
}]}}


@pytest.fixture(scope="module")
def tiny(protocol):
    suite = parse_suites(TINY, "test", protocol)["tiny"]
    return suite, run_suite(suite, protocol, command="python -m bench run tiny", log=lambda _: None)


def test_declared_suites_load_and_their_recipes_calibrate_as_the_protocol_says():
    protocol, suites = load_protocol(), load_suites()
    assert {"fidelity", "quantize", "sparsity", "backends", "npu-sim", "qat", "vision"} <= set(suites)
    assert suites["qat"].needs == "cuda"
    cal, emb = protocol["calibration"], protocol["embedding"]
    recipes = {(row.recipe, table.measure, table.calibration) for s in suites.values() for table in s.tables
               for row in table.rows if row.recipe}
    assert {"smollm2-2of4.yaml", "smollm2-sparse50.yaml", "smollm2-w8a8.yaml", "minilm-w8a8.yaml",
            "ppocr-rec-w8a8.yaml"} <= {name for name, _, _ in recipes}
    for name, measure, calibration_set in recipes:
        if measure == "decode" and not (ROOT / "samples" / "recipes" / name).is_file():
            continue  # a decoder recipe to come: its row is recorded as not measured
        recipe = load_recipe(ROOT / "samples" / "recipes" / name)
        if recipe.calibration is None:  # cleanup calibrates nothing
            continue
        if calibration_set:  # the table's set: the same sources, counts and windows
            expected = Context(protocol).calibration_set(calibration_set)
            assert dataclasses.replace(recipe.calibration, line=0) == dataclasses.replace(expected, line=0), name
            continue
        if measure == "image":  # images: the protocol's count and the model's preprocessing
            assert recipe.calibration.windows == protocol["images"]["calibration"], name
            assert recipe.calibration.image is not None, name
            continue
        expected = (emb["calib_batches"], emb["calib_max_length"]) if measure == "embedding" else (
            cal["windows"], cal["length"])
        assert (recipe.calibration.windows, recipe.calibration.length) == expected, name


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(measure="speed"), "measure 'speed' is not one of"),
    (lambda t: t.update(colour="red"), "unknown key 'colour'"),
    (lambda t: t["rows"][1].update(against="nothing"), "compared with 'nothing', which is no earlier row"),
    (lambda t: t["rows"][0].pop("reference"), "exactly one row with 'reference: true'"),
    (lambda t: t["rows"][1].update(build={"magic": {}}), "each build step is one of"),
    (lambda t: t["rows"][1].update(runtime="gpu"), "runtime 'gpu' is not one of"),
    (lambda t: t.update(model="resnet"), "model 'resnet' is not in the protocol's models"),
    (lambda t: t.update(calibration="no-such-set"), "calibration set 'no-such-set' is not in the protocol's"),
    (lambda t: t["targets"].append({"row": "w8a8", "column": "ppl"}), "exactly one of 'min' or 'max'"),
])
def test_malformed_suites_name_the_entry(protocol, change, message):
    data = json.loads(json.dumps(TINY))
    change(data["tiny"]["tables"][0])
    with pytest.raises(SuiteError, match=message) as info:
        parse_suites(data, "suites.yaml", protocol)
    assert "suites.yaml: suite 'tiny', table #1" in str(info.value)


def test_a_tiny_suite_runs_end_to_end_into_the_result_schema(tiny, tmp_path):
    _, result = tiny
    assert result["schema"] == SCHEMA and result["suite"] == "tiny" and result["command"] == "python -m bench run tiny"
    assert result["protocol"]["evaluation"]["windows"] == 2 and result["environment"]["versions"]["onnxruntime"]
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [r["name"] for r in TINY["tiny"]["tables"][0]["rows"]]
    fp32, cleanup, w8a8, w4a8 = rows["fp32"], rows["cleanup"], rows["w8a8"], rows["w4a8"]
    # the float model's top-1 may be trivial on the tiny model: fidelity is asserted on SQNR and ppl
    assert cleanup["sqnr_db"] == float("inf") and cleanup["ppl"] == pytest.approx(fp32["ppl"], rel=1e-6)
    assert w8a8["sqnr_db"] > 30 and abs(w8a8["ppl_ratio"] - 1) < 0.03 and w8a8["bytes_ratio"] < 0.4
    assert w8a8["ppl[pydoc-calib]"] > 1 and w8a8["overlap@1 gap[pydoc-calib]"] == pytest.approx(
        w8a8["overlap@1"] - w8a8["overlap@1[pydoc-calib]"])
    # the broken variant: 4-bit weights fail the assertion the 8-bit row passes
    assert w4a8["sqnr_db"] < 30 and w4a8["sqnr_db"] < w8a8["sqnr_db"] - 5
    assert rows["ort-dynamic"]["build_s"] > 0 and rows["ort-dynamic"]["sqnr_db"] > 30
    assert "no_such_package" in rows["absent"]["skipped"] and "ppl" not in rows["absent"]
    simulated = rows["w8a8 npu-sim"]
    assert simulated["overlap@1 vs w8a8"] >= 0.99 and simulated["sqnr_db"] > 30 and simulated["sim_s_per_window"] > 0
    qat = rows["qat"]
    assert qat["train_steps"] == 2 and qat["sqnr_db"] > 30 and qat["torch_overlap@1"] >= 0.9
    assert qat["int16"] == "2/9 activations, 2/24 points"  # both down_proj inputs, of 9 activations, 24 points
    # small: rows, protocol, environment, command, date, and no per-window or per-layer lists
    text = json.dumps(result)
    assert len(text) < 20_000 and not any(isinstance(v, list) for r in result["rows"] for v in r.values())
    write_result(result, tmp_path / "tiny.json")
    assert load_results(tmp_path) == {"tiny": json.loads((tmp_path / "tiny.json").read_text())}


def test_the_report_shows_command_protocol_tables_and_targets(tiny):
    suite, result = tiny
    text = render_suite(suite, result)
    assert text.startswith("## Tiny suite (`tiny`)") and "```\npython -m bench run tiny\n```" in text
    assert "Protocol: causal LMs: 2 evaluation windows × 32 tokens of pydoc (sample:pydoc-topics, eval split), " \
           "pydoc-calib (sample:pydoc-topics, calib split)" in text
    assert "| name | ppl | ppl × | overlap@1 | SQNR dB | MB on disk |" in text and "| cleanup | " in text
    assert "`absent` not measured: 'no_such_package' is not importable" in text
    assert "| w8a8: sqnr_db >= 30 |" in text and "| met |" in text and "| **missed** |" in text
    assert "No result recorded yet" in render({"tiny": suite}, {})


def test_results_md_is_generated_from_the_results():
    assert main(["report", "--check"]) == 0
    for suite, result in load_results().items():
        assert set(result) >= {"rows", "protocol", "environment", "command", "date"}, suite


def test_command_line_errors(capsys):
    assert main(["run", "no-such-suite"]) == 2
    assert "no suite 'no-such-suite'" in capsys.readouterr().err
    assert main(["run", "fidelity", "--only", "cleanup", "--json"]) == 2
    assert main(["run", "qat"]) == 2 and "--device cuda" in capsys.readouterr().err


def test_a_table_names_a_calibration_set_its_rows_and_recipes_share(protocol, tiny_onnx, tmp_path):
    sets = {"tiny-mixed": {"windows": 3, "length": 32, "sources": [
        "sample:pydoc-topics", {"path": "generated:sample:pydoc-topics", "count": 1, "prompt_tokens": 4}]}}
    with_set = protocol.replace(calibration={"sets": sets})
    data = json.loads(json.dumps(TINY))
    data["tiny"]["tables"][0]["calibration"] = "tiny-mixed"
    table = parse_suites(data, "test", with_set)["tiny"].tables[0]
    ctx = Context(with_set, log=lambda _: None)
    feeds = ctx.calibration(tiny_onnx, table.calibration)
    assert len(feeds) == 3 and ctx.calibration(tiny_onnx, table.calibration) is feeds  # made once a run
    same = parse_recipe("passes: [quantize]\ncalibration:\n  sources: [sample:pydoc-topics, "
                        "{path: 'generated:sample:pydoc-topics', count: 1, prompt_tokens: 4}]\n  windows: 3\n  length: 32\n",
                        ROOT / "samples" / "recipes" / "x.yaml")
    builder = Builder(ctx, table)
    builder._check_calibration(same, "row")  # agrees: no error
    other = parse_recipe("passes: [quantize]\ncalibration:\n  source: sample:pydoc-topics\n  windows: 3\n  length: 32\n",
                         ROOT / "samples" / "recipes" / "x.yaml")
    with pytest.raises(SuiteError, match="calibration set 'tiny-mixed'"):
        builder._check_calibration(other, "row")


def test_the_report_describes_a_calibration_set_only_where_the_result_recorded_it(protocol, tiny):
    suite, result = tiny
    sets = {"tiny-mixed": {"windows": 3, "length": 32, "sources": ["sample:pydoc-topics"]}}
    data = json.loads(json.dumps(TINY))
    data["tiny"]["tables"][0]["calibration"] = "tiny-mixed"
    named = parse_suites(data, "test", protocol.replace(calibration={"sets": sets}))["tiny"]
    assert "the set 'tiny-mixed'" not in render_suite(named, result)  # a result recorded before the set existed
    cal = {**result["protocol"]["calibration"], "sets": sets}
    assert "the set 'tiny-mixed', 3 windows" in render_suite(named, {**result, "protocol": {**result["protocol"],
                                                                                             "calibration": cal}})


def test_the_memory_measure_runs_convert_in_a_process_of_its_own(protocol, tmp_path, monkeypatch):
    """A small synthetic chain (2 x 256) through the memory suite's convert rows: peak RSS, bytes,
    the report's fidelity; a recipe that fails names the row."""
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    small = protocol.replace(models={**protocol["models"], "chain": "synthetic:matmul-chain:2x256"})
    table = {"name": "chain", "title": "chain", "model": "chain", "measure": "memory", "about": "memory",
             "columns": ["model_bytes", "peak_rss", "rss_ratio", "output_bytes", "sqnr_db"],
             "rows": [{"name": "cleanup", "build": {"convert": {"recipe": "cleanup.yaml"}}},
                      {"name": "w8", "build": {"convert": {"recipe": "w8-weights.yaml"}}}]}
    suite = parse_suites({"mem": {"title": "mem", "about": "mem", "tables": [table]}}, "test", small)["mem"]
    rows = {r["name"]: r for r in run_suite(suite, small, log=lambda _: None)["rows"]}
    assert 2 * 256 * 256 * 4 <= rows["cleanup"]["model_bytes"] < 2 * 256 * 256 * 4 + 1024  # weights + graph
    assert rows["cleanup"]["peak_rss"] > 50e6 and rows["cleanup"]["rss_ratio"] > 1  # a Python process, not the weights
    assert rows["w8"]["output_bytes"] < rows["cleanup"]["output_bytes"] / 3 and rows["w8"]["sqnr_db"] > 30
    broken = {**table, "rows": [{"name": "bad", "build": {"convert": {"recipe": "no-such-recipe.yaml"}}}]}
    with pytest.raises(SuiteError, match="row 'bad'.*no recipe 'no-such-recipe.yaml'"):
        run_suite(parse_suites({"mem": {"title": "mem", "about": "mem", "tables": [broken]}}, "test", small)["mem"],
                  small, log=lambda _: None)


# ------------------------------------------------------------------------------- decode suite
DECODE_PROTOCOL = {"corpus": "pydoc", "prompts": 2, "prompt_tokens": 16, "new_tokens": 12, "contexts": [16, 48],
                   "prefill": 48, "steps": 4, "rounds": 2}
DECODE = {"decode": {"title": "Decoders", "about": "The tiny Llama as decoders.", "tables": [{
    "name": "tiny", "title": "tiny Llama decoders", "model": "tiny-llama", "measure": "decode", "about": "What they show.",
    "columns": ["bytes", "prefill_s", "tok_s@16", "tok_s@48", "tok_s 48/16", "peak_rss", "greedy_overall",
                "logits_max_diff", "load"],
    "ratios": ["bytes"], "quotients": {"tok_s 48/16": ["tok_s@48", "tok_s@16"]},
    "rows": [
        {"name": "ort", "build": {"decoder": {"attention": "ort", "capacity": 96}}, "reference": True},
        {"name": "portable", "build": {"decoder": {"attention": "portable", "capacity": 64, "prefill_chunk": 16}}},
        {"name": "genai", "build": {"genai": {"precision": "fp32"}}, "requires": "no_such_package"},
        {"name": "later", "build": {"recipe": "no-such-decoder-recipe.yaml"}},
    ],
    "targets": [{"row": "ort", "column": "greedy_overall", "min": 1.0},
                {"row": "portable", "column": "logits_max_diff", "max": 1e-4},
                {"row": "portable", "column": "tok_s@16", "min": "ort", "factor": 100},
                {"row": "ort", "column": "tok_s 48/16", "min": 0.01}],
}]}}


@pytest.fixture(scope="module")
def decode_protocol(protocol):
    return protocol.replace(decode=DECODE_PROTOCOL)


@pytest.fixture(scope="module")
def decoded(decode_protocol):
    suite = parse_suites(DECODE, "test", decode_protocol)["decode"]
    return suite, run_suite(suite, decode_protocol, command="python -m bench run decode", log=lambda _: None)


def test_greedy_agreement_counts_tokens_before_the_first_divergence():
    from bench.decode import agreement

    reference = np.arange(24).reshape(2, 12)
    assert agreement(reference.copy(), reference) == {"greedy_prefix": 1.0, "greedy_overall": 1.0,
                                                      "first_divergence": 12.0}
    broken = reference.copy()
    broken[0, 3] = -1  # prompt 0 diverges after 3 tokens and agrees again after; prompt 1 never diverges
    assert agreement(broken, reference) == {"greedy_prefix": 15 / 24, "greedy_overall": 23 / 24,
                                            "first_divergence": 7.5}


def test_the_decode_worker_scores_a_decoder_against_the_reference_and_fails_a_broken_one(decode_protocol, tmp_path):
    """The fidelity run of a tiny ort decoder folder against transformers' greedy reference; the same
    run against a reference whose one step was changed (a logit moved, the token it chose) fails."""
    from bench.decode import agreement, make_reference, transformers_model, window_overlaps, worker
    from graphopt.frontends.decoder_folder import save_decoder
    from tests.decoding import tiny_decoder

    ctx = Context(decode_protocol, log=lambda _: None)
    hf, tokenizer = transformers_model("sample:tiny-llama", lambda *_: None)
    reference = make_reference(hf, tokenizer, ctx, tmp_path)
    save_decoder(tiny_decoder("ort"), tmp_path / "ort", log=lambda *_: None)
    job = {"task": "fidelity", "runtime": "graphopt", "folder": str(tmp_path / "ort"), "threads": 1}

    def score(tokens, logits):
        np.save(tmp_path / "prompts.npy", reference.prompts)
        np.save(tmp_path / "tokens.npy", tokens)
        np.save(tmp_path / "logits.npy", logits)
        answer = worker({**job, "prompts": str(tmp_path / "prompts.npy"), "tokens": str(tmp_path / "tokens.npy"),
                         "logits": str(tmp_path / "logits.npy")})
        return answer, agreement(np.array(answer["greedy"]), tokens)

    logits = np.load(reference.logits)
    answer, greedy = score(reference.tokens, logits)
    assert greedy["greedy_overall"] == 1.0 and answer["max_diff"] <= 1e-4 and answer["peak_rss"] > 30e6
    assert np.array_equal(answer["top1"], reference.tokens)
    np.save(tmp_path / "windows.npy", reference.windows)  # the prefill protocol's windows: 2 x 32 tokens here
    answer = worker({**job, "prompts": str(tmp_path / "prompts.npy"), "tokens": str(tmp_path / "tokens.npy"),
                     "logits": str(tmp_path / "logits.npy"), "windows": str(tmp_path / "windows.npy")})
    assert reference.windows.shape == reference.window_top1.shape == (2, 32)
    assert window_overlaps(answer, reference.window_top1) == {"steps_overlap@1": 1.0, "prefill_overlap@1": 1.0,
                                                              "steps_gap": 0.0}
    answer["window_steps"][1][7] = -1  # one decode step's argmax wrong: the gap shows it
    assert window_overlaps(answer, reference.window_top1)["steps_gap"] == pytest.approx(1 / 64)
    assert window_overlaps({**answer, "window_prefill": None}, reference.window_top1)["steps_gap"] is None
    tokens, logits = reference.tokens.copy(), logits.copy()
    tokens[1, 5] = (tokens[1, 5] + 1) % logits.shape[-1]
    logits[1, 5, tokens[1, 5]] += 1e-3
    answer, greedy = score(tokens, logits)
    assert greedy["greedy_overall"] < 1.0 and greedy["first_divergence"] == (12 + 5) / 2
    assert answer["max_diff"] > 1e-4


def test_a_decode_table_runs_its_rows_in_processes_of_their_own(decoded):
    _, result = decoded
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["ort", "portable", "genai", "later"]
    for name in ("ort", "portable"):
        row = rows[name]
        assert row["greedy_overall"] == 1.0 and row["greedy_prefix"] == 1.0 and row["tf_overlap@1"] == 1.0
        assert row["steps_overlap@1"] == row["prefill_overlap@1"] == 1.0 and row["steps_gap"] == 0.0
        assert row["logits_max_diff"] <= 1e-4 and row["build_s"] > 0 and row["load"] >= 0
        assert row["prefill_s"] > 0 and row["tok_s@16"] > 0 and row["tok_s@48"] > 0
        assert row["tok_s 48/16"] == pytest.approx(row["tok_s@48"] / row["tok_s@16"])
        assert 30e6 < row["peak_rss"] and 200_000 < row["bytes"] < 2_000_000  # a process, a tiny model's weights
    assert rows["ort"]["build"] == "graphopt decoder {attention: ort, capacity: 96}"
    assert rows["portable"]["bytes_ratio"] == pytest.approx(rows["portable"]["bytes"] / rows["ort"]["bytes"])
    assert "no_such_package" in rows["genai"]["skipped"] and "no recipe" in rows["later"]["skipped"]
    assert not any(isinstance(v, list) for r in result["rows"] for v in r.values())


def test_the_decode_report_shows_targets_against_rows_and_quotients(decoded):
    suite, result = decoded
    text = render_suite(suite, result)
    assert "Protocol: decoders: 2 prompts of 16 tokens of pydoc (eval split) × 12 new tokens" in text
    assert "| ort: greedy_overall >= 1 | 1 (bound 1) | met |" in text
    assert "| portable: tok_s@16 >= 100 x ort's |" in text and "| **missed** |" in text
    assert "| ort: tok_s 48/16 >= 0.01 |" in text
    assert "`genai` not measured: 'no_such_package'" in text


@pytest.mark.parametrize("row, message", [
    ({"name": "bad", "build": {"passes": ["cleanup"]}}, "built by one of decoder, recipe, genai"),
    ({"name": "bad", "build": [{"decoder": {}}, {"genai": {}}]}, "built by one of decoder, recipe, genai"),
])
def test_decode_rows_are_built_as_decoders(decode_protocol, row, message):
    data = json.loads(json.dumps(DECODE))
    data["decode"]["tables"][0]["rows"].append(row)
    with pytest.raises(SuiteError, match=message):
        parse_suites(data, "suites.yaml", decode_protocol)


def test_a_decode_recipe_row_needs_a_decoder_section(decode_protocol):
    from bench.decode import build_row

    data = json.loads(json.dumps(DECODE))
    data["decode"]["tables"][0]["rows"].append({"name": "prefill-only", "build": {"recipe": "cleanup.yaml"}})
    table = parse_suites(data, "test", decode_protocol)["decode"].tables[0]
    with pytest.raises(SuiteError, match="row 'prefill-only'.*cleanup.yaml has no decoder: section"):
        build_row(Context(decode_protocol), table, table.rows[-1], ROOT / "unused", lambda: ROOT)


def test_a_worker_reports_its_own_peak_memory_not_its_parents(tmp_path):
    """A worker started by a process holding 800 MB reports its own peak (ru_maxrss would report
    the parent's: Linux counts what the parent held when it started the worker)."""
    from bench.decode import DecoderRow, _worker, peak_rss
    from graphopt.frontends.decoder_folder import save_decoder
    from tests.decoding import tiny_decoder

    save_decoder(tiny_decoder("ort"), tmp_path / "ort", log=lambda *_: None)
    np.save(tmp_path / "speed.npy", np.arange(64) % 200)
    held = np.ones(100_000_000)  # 800 MB, touched
    assert peak_rss() > 800e6
    answer = _worker(DecoderRow(tmp_path / "ort", "graphopt", 0.0), "speed",
                     {"threads": 1, "speed": str(tmp_path / "speed.npy"), "contexts": [16], "steps": 2}, "test")
    del held
    assert 20e6 < answer["peak_rss"] < 600e6 and answer["tok_s"]["16"] > 0
