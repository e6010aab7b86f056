"""Generated calibration windows (`generated:SOURCE`): text the float model writes from prompts of a source.

On the tiny Llama (bytes), six 64-byte windows prompted with 8 bytes of pydoc paragraphs have a
perplexity of 9.6 under the model that wrote them (its own samples at temperature 1; real text:
6.9); a model that sees its context reversed while writing (the broken variant) writes text it
finds at 242.
"""

import numpy as np
import pytest

from graphopt.evaluation.metrics import nll_sum
from graphopt.frontends import corpora
from graphopt.frontends.calibration import CalibrationError, CalibrationSpec, parse_source
from graphopt.recipe import parse_recipe


def _spec(*sources, windows=6, length=64) -> CalibrationSpec:
    return CalibrationSpec(sources=tuple(parse_source(s) for s in sources), windows=windows, length=length)


GENERATED = {"path": "generated:sample:pydoc-topics", "prompt_tokens": 8}


def _own_perplexity(model, feeds, prompt: int = 8) -> float:
    """The model's perplexity on the windows, over the tokens after the prompt."""
    run, total, count = model.runner(), 0.0, 0
    for feed in feeds:
        ids = feed["input_ids"]
        loss, n = nll_sum(run(feed)[0][:, prompt - 1:], ids[:, prompt - 1:])
        total, count = total + loss, count + n
    return float(np.exp(total / count))


def test_the_model_writes_windows_it_finds_likely(tiny_onnx, monkeypatch):
    feeds = _spec(GENERATED).feeds(tiny_onnx)
    assert len(feeds) == 6 and all(f["input_ids"].shape == (1, 64) and f["input_ids"].dtype == np.int64 for f in feeds)
    assert _own_perplexity(tiny_onnx, feeds) < 10.5  # measured 9.6
    # each window starts with the first 8 bytes of a pydoc paragraph, spread over the split
    heads = {bytes(p.strip().encode()[:8]) for p in corpora.text_split("calib").split("\n\n") if p.strip()}
    assert all(bytes(f["input_ids"][0, :8].astype(np.uint8)) in heads for f in feeds)
    assert len({bytes(f["input_ids"][0, :8].astype(np.uint8)) for f in feeds}) == 6
    runner = type(tiny_onnx).runner

    def reversed_context(self, threads=0):
        run = runner(self, threads)
        return lambda feeds: run({k: np.ascontiguousarray(v[:, ::-1]) for k, v in feeds.items()})

    monkeypatch.setattr(type(tiny_onnx), "runner", reversed_context)
    broken = _spec(GENERATED).feeds(tiny_onnx)
    monkeypatch.undo()
    assert not _own_perplexity(tiny_onnx, broken) < 10.5


def test_seeded_mixed_with_other_sources_and_from_a_file(tmp_path, tiny_onnx):
    first = _spec(GENERATED, windows=2).feeds(tiny_onnx)
    again = _spec(GENERATED, windows=2).feeds(tiny_onnx)
    other = _spec({**GENERATED, "seed": 1}, windows=2).feeds(tiny_onnx)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))
    mixed = _spec("sample:pydoc-topics", {**GENERATED, "count": 2}, windows=6).feeds(tiny_onnx)
    real = corpora.lm_windows(None, "calib", 4, 64)
    assert sum(any(np.array_equal(f["input_ids"], w) for w in real) for f in mixed) == 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time there was a lighthouse.\n\nshort\n\nDear Margaret, thank you for the letter.\n")
    feeds = _spec({"path": f"generated:{prompts}", "prompt_tokens": 12, "skip": 1}, windows=2).feeds(tiny_onnx)
    assert [bytes(f["input_ids"][0, :12].astype(np.uint8)) for f in feeds] == [b"Dear Margare"] * 2


def test_a_recipe_names_a_generated_source_beside_it(tmp_path, tiny_onnx):
    (tmp_path / "prompts.txt").write_text("Once upon a time there was a lighthouse keeper.\n")
    recipe = parse_recipe("passes: [cleanup]\ncalibration:\n  sources:\n    - sample:pydoc-topics\n"
                          "    - {path: generated:prompts.txt, count: 1, prompt_tokens: 4, temperature: 0.8}\n"
                          "  windows: 3\n  length: 32\n", tmp_path / "r.yaml")
    source = recipe.calibration.sources[1]
    assert source.path == f"generated:{tmp_path / 'prompts.txt'}" and source.temperature == 0.8
    assert len(recipe.calibration_feeds(tiny_onnx)) == 3


@pytest.mark.parametrize("value, message", [
    ({"path": "generated:sample:pydoc-topics", "temperature": 0}, "'temperature' must be positive"),
    ({"path": "generated:sample:pydoc-topics", "prompt_tokens": 0}, "prompt_tokens"),
    ({"path": "generated:generated:sample:pydoc-topics"}, "not from another generated source"),
    ({"path": "generated:no-such.txt"}, "no such file"),
    ({"path": "sample:pydoc-topics", "seed": 3}, "for generated: sources"),
])
def test_bad_generated_sources_are_named(value, message):
    with pytest.raises(CalibrationError, match=message):
        parse_source(value)


def test_prompts_must_fit_the_window_and_the_model_must_write(tmp_path, tiny_onnx):
    with pytest.raises(CalibrationError, match="prompt_tokens 64 must be below the window length 64"):
        _spec({**GENERATED, "prompt_tokens": 64}).feeds(tiny_onnx)
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, input_ids=np.zeros((2, 1, 8), np.int64))
    with pytest.raises(CalibrationError, match="takes its prompts from text"):
        _spec({"path": f"generated:{feeds}"}).feeds(tiny_onnx)
    (tmp_path / "short.txt").write_text("too short\n")
    with pytest.raises(CalibrationError, match="has 16 tokens to prompt with"):
        _spec(f"generated:{tmp_path / 'short.txt'}").feeds(tiny_onnx)
