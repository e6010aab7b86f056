"""`graphopt generate`: streams the tokens graphopt.generate makes, prints the figures, refuses bad input in one line."""

import json

import pytest

import graphopt
from graphopt import cli
from graphopt.frontends.decoder_folder import save_decoder
from tests.decoding import PROMPT, tiny_decoder

TEXT = bytes(PROMPT).decode()


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
