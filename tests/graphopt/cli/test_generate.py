"""`graphopt generate`: streams the tokens graphopt.generate makes, prints the figures, refuses bad input in one line."""

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
from graphopt import cli
from graphopt.frontends.decoder_folder import save_decoder
from tests.decoding import PROMPT, tiny_decoder

TEXT = bytes(PROMPT).decode()
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module", params=["ort", "portable"])
def folder(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder") / request.param
    save_decoder(tiny_decoder(request.param), out, log=lambda *_: None)
    return out


def test_tokens_equal_the_python_api(folder, capsys):
    assert cli.main(["generate", str(folder), "--prompt", TEXT, "--max-new-tokens", "24", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = graphopt.generate(folder, TEXT, max_new_tokens=24)
    assert printed["tokens"] == expected.tokens and printed["prompt_tokens"] == PROMPT
    assert cli.main(["generate", str(folder), "--prompt", TEXT, "--max-new-tokens", "24", "--temperature", "0.8",
                     "--top-p", "0.9", "--seed", "5", "--json"]) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert sampled["tokens"] == graphopt.generate(folder, TEXT, max_new_tokens=24, temperature=0.8, top_p=0.9,
                                                  seed=5).tokens


def test_streams_text_and_prints_the_figures(folder, capsys):
    assert cli.main(["generate", str(folder), "--prompt", TEXT, "--max-new-tokens", "16", "--greedy"]) == 0
    captured = capsys.readouterr()
    assert captured.out == graphopt.generate(folder, TEXT, max_new_tokens=16).text + "\n"
    assert "16 tokens (length)" in captured.err and "tokens/s" in captured.err
    assert "time to first token" in captured.err and "peak memory" in captured.err


def test_no_spin_reaches_the_sessions(folder, capsys, monkeypatch):
    """--no-spin: the sessions' worker threads sleep between kernels; by default they spin (onnxruntime's default)."""
    from graphopt.evaluation import generation

    made = []
    real = generation.Generator.__init__

    def recording(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(generation.Generator, "__init__", recording)
    for flags in ([], ["--no-spin"]):
        assert cli.main(["generate", str(folder), "--prompt", TEXT, "--max-new-tokens", "2", "--json", *flags]) == 0
    spinning = [{s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
                 for s in g.sessions.values()} for g in made]
    assert spinning == [{"1"}, {"0"}]


@pytest.mark.parametrize("args,message", [
    (["--top-p", "0.5"], "--top-p: sampling needs --temperature"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--chat"], "no chat template"),
    (["--greedy", "--temperature", "1"], "not allowed with argument"),
])
def test_bad_arguments_are_one_line_errors(folder, capsys, args, message):
    assert cli.main(["generate", str(folder), "--prompt", "hi", *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("graphopt")]
    assert len(errors) == 1 and message in errors[0]


def test_long_prompts_and_other_folders_are_refused(folder, tmp_path, capsys):
    assert cli.main(["generate", str(folder), "--prompt", "x" * 97]) == 2
    assert "more than the decoder's capacity of 96" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not a decoder folder" in capsys.readouterr().err


# ------------------------------------------------------------------ convert -> generate (decoder recipes)
RECIPES = sorted((REPO / "samples" / "recipes").glob("smollm2-decoder-*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_decoder_recipes_convert_to_folders_that_generate(recipe, tmp_path, capsys):
    """A shipped decoder recipe on the tiny Llama: convert writes a decoder folder in the kernel form, whose
    logits are the in-memory pipeline's (same calibration, same passes) and which `graphopt generate` runs."""
    from graphopt.analysis.linear_sites import is_online_rotation
    from graphopt.evaluation.generation import Generator
    from graphopt.recipe import load_recipe

    out = tmp_path / "out"
    loaded = load_recipe(recipe)
    small = ["--calibration-windows", "2", "--calibration-length", "32"] if loaded.calibration else []
    assert cli.main(["convert", "sample:tiny-llama", "--recipe", str(recipe), "-o", str(out), "--no-verify",
                     *small]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"decoder.json", "genai_config.json", "model.onnx", "model.onnx.data", "report.json"} <= files
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    # per layer: q/k/v packed, o, gate/up packed, down (fuse_ort_ops); then the lm_head. Unpacked: 7 per layer
    fuse = next(p for p in loaded.passes if p.name == "fuse_ort_ops")
    linears = 2 * 4 + 1 if fuse.pack else 2 * 7 + 1
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4  # residual sums' norms
    if not any(p.name == "quantize" for p in loaded.passes):  # a float recipe: every linear a float MatMul
        assert ops["MatMul"] == linears and not ops["MatMulNBits"] + ops["MatMulIntegerToFloat"]
    else:
        assert ops["MatMulNBits"] + ops["MatMulIntegerToFloat"] == linears
        offsets = [n for n in graph.node if n.op_type == "MatMul" and any("offset" in i or "block_sums" in i for i in n.input)]
        turns = [n for n in graph.node if n.op_type == "MatMul" and is_online_rotation(n.input[1])]  # float by design
        assert ops["MatMul"] - len(offsets) - len(turns) <= 1  # else at most the 16-bit rotated gain stays float

    decoder = graphopt.load("sample:tiny-llama", decoder=loaded.decoder, log=lambda *_: None)
    calib = loaded.calibration.overridden(windows=2, length=32).feeds(decoder) if loaded.calibration else None
    expected = graphopt.Pipeline(loaded.passes, log=lambda *_: None).run(decoder, calib=calib).model
    folder, memory = (Generator.load(m, threads=1, log=lambda *_: None).start(64) for m in (out, expected))
    np.testing.assert_allclose(folder.feed(PROMPT), memory.feed(PROMPT), rtol=0, atol=1e-5)

    capsys.readouterr()
    assert cli.main(["generate", str(out), "--prompt", TEXT, "--max-new-tokens", "8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tokens"] == graphopt.generate(out, TEXT, max_new_tokens=8).tokens and len(printed["tokens"]) == 8


def test_convert_refuses_models_that_are_not_decoders_before_writing(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: []\ndecoder: {attention: ort}\n")
    out = tmp_path / "out"
    assert cli.main(["convert", "sample:minilm", "--recipe", str(recipe), "-o", str(out)]) == 2
    assert "is not a Llama-family decoder" in capsys.readouterr().err and not out.exists()
    recipe.write_text("passes: []\ncalibration: {windows: 2, length: 64}\ndecoder: {capacity: 48, prefill_chunk: 16}\n")
    assert cli.main(["convert", "sample:tiny-llama", "--recipe", str(recipe), "-o", str(out)]) == 2
    assert "windows of 64 tokens do not fit the capacity of decoder 'tiny-llama' (48 tokens)" in capsys.readouterr().err
    assert not out.exists()


def test_a_decoder_folder_converts_to_a_decoder_folder(folder, tmp_path, capsys):
    """A decoder folder as MODEL (a recipe without a decoder: section) is written back as a decoder folder that
    generates, not as a lone model.onnx `graphopt generate` cannot run; the portable form is refused by name."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - cleanup\n")
    out = tmp_path / "out"
    code = cli.main(["convert", str(folder), "--recipe", str(recipe), "-o", str(out), "--no-verify"])
    if folder.name == "portable":
        assert code == 2 and "a portable decoder folder holds two static graphs" in capsys.readouterr().err
        return
    assert code == 0 and {"decoder.json", "model.onnx", "report.json"} <= {p.name for p in out.iterdir()}
    assert graphopt.generate(out, TEXT, max_new_tokens=8).tokens == graphopt.generate(folder, TEXT, max_new_tokens=8).tokens
