"""graphopt.recipe: passes built from YAML, errors that name the file, the line and the option."""

import os
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pytest

from graphopt.errors import RecipeError
from graphopt.ir import Model
from graphopt.pipeline.passes import PASSES, Pass, PassResult
from graphopt.recipe import Calibration, Recipe, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class _Scale(Pass):
    """Test pass: multiplies nothing; only its options matter here."""

    name: ClassVar[str] = "test_recipe_scale"
    factor: float = 1.0
    mode: Literal["fast", "exact"] = "fast"

    def run_onnx(self, model: Model, ctx) -> PassResult:
        return PassResult(model, False)


@dataclass(frozen=True)
class _Needs(Pass):
    """Test pass with a required option."""

    name: ClassVar[str] = "test_recipe_needs"
    target: str

    def run_onnx(self, model: Model, ctx) -> PassResult:
        return PassResult(model, False)


@dataclass(frozen=True)
class _Trainable(Pass):
    """Test pass that only runs on the FX form."""

    name: ClassVar[str] = "test_recipe_fx_only"

    def run_fx(self, model: Model, ctx) -> PassResult:
        return PassResult(model, False)


@dataclass(frozen=True)
class _Reads(Pass):
    """Test pass with a file option (resolved against the recipe's folder)."""

    name: ClassVar[str] = "test_recipe_reads"
    table: str = field(default="", metadata={"file": True})

    def run_onnx(self, model: Model, ctx) -> PassResult:
        return PassResult(model, False)


@pytest.fixture(autouse=True)
def test_passes(monkeypatch):
    for cls in (_Scale, _Needs, _Trainable, _Reads):
        monkeypatch.setitem(PASSES, cls.name, cls)


GOOD = """\
passes:
  - test_recipe_scale
  - test_recipe_scale: {factor: 2, mode: exact}
  - test_recipe_needs:
      target: lm_head.weight
calibration:
  windows: 3
  length: 16
"""


def test_good_recipe_builds_passes_in_order():
    recipe = parse_recipe(GOOD, "good.yaml")
    assert recipe.passes == [_Scale(), _Scale(factor=2, mode="exact"), _Needs(target="lm_head.weight")]
    assert recipe.backend is None and recipe.backend_options == {}
    assert recipe.calibration == Calibration(windows=3, length=16, line=6)
    assert recipe.path == Path("good.yaml")


@pytest.mark.parametrize("text, line, words", [
    ("passes:\n  - test_recipe_scale:\n      factor: 2\n      bogus: 1\n", 4, ["unknown option 'bogus'"]),
    ("passes:\n  - test_recipe_scale:\n      factor: 2\n      mode: slow\n", 4, ["option 'mode'", "'slow'"]),
    ("passes:\n  - test_recipe_scale:\n      factor: fast\n", 3, ["option 'factor'"]),
    ("passes:\n  - test_recipe_scale\n  - no_such_pass\n", 3, ["unknown pass 'no_such_pass'"]),
    ("passes:\n  - test_recipe_needs\n", 2, ["test_recipe_needs", "target"]),
    ("passes:\n  - test_recipe_scale: {factor: 2\n", 3, ["not valid YAML"]),
    ("passes:\n  - test_recipe_scale\npasses: []\n", 3, ["'passes' is given twice (first on line 1)"]),
    ("pases:\n  - test_recipe_scale\n", 1, ["unknown section 'pases'"]),
    ("passes: test_recipe_scale\n", 1, ["'passes' must be a list"]),
    ("passes:\n  - {test_recipe_scale: {}, test_recipe_needs: {}}\n", 2, ["pass #1"]),
    ("passes:\n  - test_recipe_scale: [1, 2]\n", 2, ["options must be a mapping"]),
    ("passes:\n  - test_recipe_fx_only\n  - test_recipe_scale\n  - test_recipe_fx_only\n", 4,
     ["pass 'test_recipe_fx_only' needs the FX form", "after test_recipe_fx_only, test_recipe_scale"]),
    ("passes: []\nbackend: no_such_backend\n", 2, ["unknown backend 'no_such_backend'"]),
    ("passes: []\nbackend: {device: x}\n", 2, ["'name'"]),
    ("passes: []\ncalibration:\n  windows: 0\n", 3, ["option 'windows'", "positive integer"]),
    ("passes: []\ncalibration:\n  source: hub:wikitext\n", 3, ["option 'source'"]),
    ("passes: []\ncalibration:\n  split: test\n", 3, ["option 'split'"]),
    ("passes: []\ncalibration:\n  shuffle: true\n", 3, ["unknown option 'shuffle'"]),
    ("passes: []\ndecoder:\n  attention: fast\n", 3, ["decoder:", "'attention' must be one of ort, portable"]),
    ("passes: []\ndecoder:\n  capacity: 0\n", 3, ["'capacity' must be an integer in [1,"]),
    ("passes: []\ndecoder:\n  window: 4\n", 3, ["unknown decoder option 'window'"]),
    ("passes: []\ndecoder:\n  capacity: 64\n  prefill_chunk: 128\n", 4,
     ["'prefill_chunk' (128) is larger than the capacity (64)"]),
    ("passes: []\ndecoder: ort\n", 2, ["decoder must be a mapping"]),
])
def test_errors_name_file_line_and_option(text, line, words):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml")
    message = str(info.value)
    assert message.startswith(f"r.yaml, line {line}: "), message
    for word in words:
        assert word in message, message


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(RecipeError, match="empty"):
        parse_recipe("", "r.yaml")
    with pytest.raises(RecipeError, match="needs a 'passes:' list"):
        parse_recipe("backend: x\n", "r.yaml")
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    assert load_recipe(path).path == path


def test_calibration_feeds_for_the_tiny_model(tiny_fx):
    recipe = parse_recipe(GOOD, "good.yaml")
    feeds = recipe.calibration_feeds(tiny_fx)
    assert len(feeds) == 3
    assert all(set(f) == {"input_ids"} and f["input_ids"].shape == (1, 16) and f["input_ids"].dtype == np.int64
               for f in feeds)
    assert max(int(f["input_ids"].max()) for f in feeds) < 256  # byte vocabulary
    assert Recipe(passes=[]).calibration_feeds(tiny_fx) is None


def test_calibration_needs_a_tokenizer_and_a_text_model(tiny_onnx):
    recipe = parse_recipe(GOOD, "good.yaml")
    no_tokenizer = tiny_onnx.replace(outputs=[tiny_onnx.outputs[0].__class__("logits", "float32", ("b", "s", 49152))])
    with pytest.raises(RecipeError, match=r"good.yaml, line 6: calibration needs the tokenizer"):
        recipe.calibration_feeds(no_tokenizer)
    with pytest.raises(RecipeError, match="'generic' model"):
        recipe.calibration_feeds(tiny_onnx.replace(task="generic"))
    too_many = parse_recipe("passes: []\ncalibration:\n  windows: 5000\n  length: 512\n", "big.yaml")
    with pytest.raises(RecipeError, match="big.yaml, line 2: calibration: asked for 5000 windows"):
        too_many.calibration_feeds(tiny_onnx)


def test_decoder_true_takes_the_defaults():
    from graphopt.frontends.decoder import DecoderOptions

    assert parse_recipe("passes: []\ndecoder: true\n", "d.yaml").decoder == DecoderOptions()


def test_decoder_section_builds_decoders_that_calibrate_on_prefills():
    from tests.decoding import tiny_decoder

    recipe = parse_recipe("passes: []\ncalibration: {windows: 3, length: 24}\n"
                          "decoder: {attention: portable, capacity: 96, prefill_chunk: 16}\n", "d.yaml")
    assert (recipe.decoder.attention, recipe.decoder.capacity, recipe.decoder.prefill_chunk) == ("portable", 96, 16)
    decoder = tiny_decoder("portable")
    feeds = recipe.calibration_feeds(decoder)
    assert len(feeds) == 3 and all(list(f) == [i.name for i in decoder.inputs] for f in feeds)
    assert feeds[0]["input_ids"].shape == (1, 24) and feeds[0]["attention_mask"].shape == (1, 1, 24, 96 + 24)
    assert not feeds[0]["past_key_values.0.key"].any()  # a prefill from an empty cache
    plain = parse_recipe("passes: []\ncalibration: {windows: 3, length: 24}\n", "p.yaml").calibration_feeds(decoder)
    assert [f["input_ids"].tolist() for f in plain] == [f["input_ids"].tolist() for f in feeds]  # the same windows
    long = parse_recipe("passes: []\ncalibration: {windows: 2, length: 128}\n", "long.yaml")
    with pytest.raises(RecipeError, match="long.yaml, line 2: calibration: windows of 128 tokens do not fit the "
                                          "capacity of decoder 'tiny-llama' \\(96 tokens\\)"):
        long.calibration_feeds(decoder)


def test_sample_cleanup_recipe():
    from graphopt.pipeline import available_passes

    if "cleanup" not in available_passes():
        pytest.skip("the cleanup pass is not registered yet")
    recipe = load_recipe(REPO / "samples" / "recipes" / "cleanup.yaml")
    assert [p.name for p in recipe.passes] == ["cleanup"]


def test_file_options_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "ranking.json").write_text('{"ranking": []}')
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - quantize:\n      int16_budget: 0.1\n      sensitivity: ranking.json\n")
    assert load_recipe(path).passes[0].sensitivity == str(tmp_path / "ranking.json")
    path.write_text("passes:\n  - quantize:\n      sensitivity: missing.json\n")
    with pytest.raises(RecipeError, match=r"r.yaml, line 3: .*no such file '.*missing.json'"):
        load_recipe(path)


@pytest.mark.real
def test_smollm2_w8a8_recipe_end_to_end(smollm2_onnx, smollm2_eval):
    """The shipped W8A8 recipe (cleanup, rotate, quantize with its ranking and 16-bit gain matrix)
    on the real model: 18 points at 16 bits, a quarter of the file, near-float predictions."""
    import graphopt
    from graphopt.evaluation.lm import evaluate_causal_lm

    recipe = load_recipe(REPO / "samples" / "recipes" / "smollm2-w8a8.yaml")
    assert [p.name for p in recipe.passes] == ["cleanup", "rotate", "quantize"]
    result = graphopt.Pipeline(recipe.passes, verify=False, progress=False, log=lambda *_: None).run(
        smollm2_onnx, calib=recipe.calibration_feeds(smollm2_onnx))
    stats = {r.name: r.stats for r in result.report.steps}
    assert stats["rotate"]["gamma_matmuls"] == 1 and stats["quantize"]["int16_points"] == 18
    assert result.model.num_bytes() < 0.255 * smollm2_onnx.num_bytes()  # 0.2533 measured
    reference_row, reference = evaluate_causal_lm(smollm2_onnx, smollm2_eval)
    row, _ = evaluate_causal_lm(result.model, smollm2_eval, reference)
    # This protocol (4 evaluation windows x 64 tokens: 256 predictions) measures overlap@1 0.9062
    # (232 of 256) and ppl 1.028x; the bench's 24 x 128 measures 0.9323 and 1.010x
    # (bench/RESULTS.md). Its windows alone range 0.83-0.95, so it cannot assert the bench figure.
    # Run to run it does not move (the pipeline writes the same bytes; 1 or 2 onnxruntime threads
    # give the same figure); onnxruntime releases move W8A8 overlap@1 by ~0.008 (pyproject.toml),
    # two predictions of 256: that is the margin.
    assert row["overlap@1"] >= 0.898 and row["ppl"] < 1.035 * reference_row["ppl"], (row, reference_row)


@pytest.mark.parametrize("path", sorted((REPO / "samples" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    """Each recipe under samples/recipes parses, names real passes with valid options and files."""
    recipe = load_recipe(path)
    assert recipe.passes


# ------------------------------------------------------------------ the reading boundary (issue 18)
def _recipe_refused(path, *words, **kwargs):
    """load_recipe refuses `path` with a short RecipeError naming it and every word; nothing is written."""
    before = sorted(os.listdir(path.parent))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, **kwargs)
    message = str(info.value)
    assert message.startswith(str(path)) and len(message) <= 600, message[:300]
    for word in words:
        assert word in message, message
    assert sorted(os.listdir(path.parent)) == before
    return message


def test_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    bomb = "passes:\n  - test_recipe_scale:\n      factor: *i\n"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "bomb.yaml"
    path.write_text("x:\n" + "\n".join("  " + line for line in lines) + "\n" + bomb)
    start = time.perf_counter()
    tracemalloc.start()
    _recipe_refused(path, "expands")
    assert tracemalloc.get_traced_memory()[1] < 16 << 20
    tracemalloc.stop()
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("text, line, words", [
    ("passes:\n  - test_recipe_scale: {factor: 2}\n  - \0\n", 3, ["'\\x00' is not allowed"]),
    ("passes:\n  - test_recipe_scale:\n      factor: !!python/object/apply:os.system [id]\n", 3,
     ["python/object/apply:os.system"]),
    ("passes:\n  - test_recipe_scale:\n      mode: " + "x" * 100000 + "\n", 3, ["option 'mode'", "characters"]),
])
def test_yaml_errors_are_one_line_naming_the_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    message = _recipe_refused(path, *words)
    assert message.startswith(f"{path}, line {line}: "), message[:200]


def test_a_recipe_over_a_mebibyte_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as fh:
        fh.truncate(1 << 31)
    _recipe_refused(path, "more than")


def test_file_options_resolve_against_the_recipe_folder_not_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "table.json").write_text("{}")
    path = folder / "r.yaml"
    path.write_text("passes:\n  - test_recipe_reads:\n      table: table.json\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe(path).passes[0].table == str((folder / "table.json").resolve())
    path.write_text("passes:\n  - prune_structure:\n      importance: scores\n      scores: s.json\n      ffn_ratio: 0.5\n")
    assert load_recipe(path).passes[0].scores == str((folder / "s.json").resolve())


@pytest.mark.parametrize("value, words", [
    ("../secret.json", ["leaves the recipe's folder"]),
    ("{outside}", ["leaves the recipe's folder"]),
    ("link.json", ["outside the recipe's folder"]),
    ("sub/../../secret.json", ["leaves"]),
])
def test_file_options_leaving_the_recipe_folder_are_refused(tmp_path, value, words):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (tmp_path / "secret.json").write_text("{}")
    (folder / "link.json").symlink_to(tmp_path / "secret.json")
    value = value.format(outside=tmp_path / "secret.json")
    for pass_text in (f"test_recipe_reads:\n      table: {value}",
                      f"prune_structure:\n      importance: scores\n      ffn_ratio: 0.5\n      scores: {value}"):
        path = folder / "r.yaml"
        path.write_text(f"passes:\n  - {pass_text}\n")
        message = _recipe_refused(path, *words, "named on the command line")
        assert "option 'table'" in message or "option 'scores'" in message


def test_a_path_named_on_the_command_line_may_be_anywhere(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (tmp_path / "secret.json").write_text("{}")
    path = folder / "r.yaml"
    path.write_text(f"passes:\n  - test_recipe_reads:\n      table: {tmp_path / 'secret.json'}\n")
    recipe = load_recipe(path, trusted_files=[tmp_path / "secret.json"])
    assert recipe.passes[0].table == str((tmp_path / "secret.json").resolve())


def test_calibration_errors_without_a_recipe_do_not_say_recipe_line_0(tiny_onnx):
    recipe = Recipe(passes=[], calibration=Calibration(windows=100000, length=512))
    with pytest.raises(RecipeError) as info:
        recipe.calibration_feeds(tiny_onnx)
    assert str(info.value).startswith("calibration: ") and "line 0" not in str(info.value)
