"""Generation: sampling, streaming, stopping, the caches' bookkeeping, and a decoder's prefill logits in evaluation."""

import dataclasses

import numpy as np
import pytest

import graphopt
from graphopt.errors import GraphoptError, OptionError
from graphopt.evaluation.generation import Generator, StaticCache, TextStream, sample_next
from graphopt.evaluation.lm import evaluate_causal_lm
from graphopt.frontends.corpora import lm_windows
from graphopt.ir.decoder import DecoderSpec
from tests.decoding import PROMPT, hf_greedy, tiny_decoder, tiny_generator, tiny_hf

FORMS = ("ort", "portable")


def test_sampling_is_seeded_and_top_p_narrows_to_the_top_token():
    generator = tiny_generator("portable")
    first = generator.generate(PROMPT, max_new_tokens=24, temperature=1.0, seed=3)
    again = generator.generate(PROMPT, max_new_tokens=24, temperature=1.0, seed=3)
    other = generator.generate(PROMPT, max_new_tokens=24, temperature=1.0, seed=4)
    greedy = generator.generate(PROMPT, max_new_tokens=24)
    narrow = generator.generate(PROMPT, max_new_tokens=24, temperature=1.0, top_p=1e-6, seed=4)
    assert first.tokens == again.tokens and first.tokens != other.tokens and first.tokens != greedy.tokens
    assert narrow.tokens == greedy.tokens


def test_sample_next_follows_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    rng = np.random.default_rng(0)
    draws = np.bincount([sample_next(logits, 1.0, 1.0, rng) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.2], atol=0.03)
    cut = {sample_next(logits, 1.0, 0.75, rng) for _ in range(200)}  # 0.5 + 0.3 reach 0.75: token 2 never
    assert cut == {0, 1}
    assert sample_next(np.array([1.0, 3.0, 3.0]), 0.0, 1.0, None) == 1  # greedy: the first of tied maxima


@pytest.mark.parametrize("form", FORMS)
def test_stream_and_stops(form):
    generator = tiny_generator(form)
    pieces = []
    result = generator.generate(PROMPT, max_new_tokens=30, stream=lambda token, piece: pieces.append((token, piece)))
    assert [t for t, _ in pieces] == result.tokens and "".join(p for _, p in pieces) == result.text
    assert result.stop == "length" and result.ttft_s > 0 and result.tokens_per_s > 0 and result.peak_rss_mib > 0
    # an end-of-sequence id the model produces stops generation, the id included
    eos = result.tokens[5]
    stopped = Generator(dataclasses.replace(generator.spec, eos_token_ids=(eos,)),
                        _Graphs(generator.sessions)).generate(PROMPT, max_new_tokens=30)
    assert stopped.stop == "eos" and stopped.tokens == result.tokens[:result.tokens.index(eos) + 1]
    # a cache that fills up ends generation there
    full = tiny_generator(form, len(PROMPT) + 4, 16 if form == "portable" else None).generate(PROMPT, max_new_tokens=30)
    assert full.stop == "capacity" and full.tokens == result.tokens[:len(full.tokens)]
    assert len(full.tokens) == 5  # the prompt's pick, then one per free slot


class _Graphs:
    """Sessions already made, handed to a Generator as its graphs."""

    def __init__(self, sessions):
        self._sessions = sessions

    def sessions(self, threads, config=None):
        return self._sessions


def test_text_stream_holds_back_partial_characters():
    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    pieces = [stream.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


def test_static_cache_writes_rows_where_the_mask_shows_them():
    spec = DecoderSpec.of(tiny_decoder("portable"))
    cache = StaticCache(spec)
    rows = [np.full((1, 2, 3, 16), i, np.float32) for i in range(4)]
    cache.write(rows, 2)  # two of three rows: the third is padding
    feeds = cache.inputs(1)
    assert feeds["position_ids"].tolist() == [[2]] and cache.room == 94
    visible = feeds["attention_mask"][0, 0, 0] == 0
    assert visible[:2].all() and not visible[2:96].any() and visible[96]
    assert (feeds["past_key_values.1.value"][:, :, :2] == 3).all() and (feeds["past_key_values.1.value"][:, :, 2:] == 0).all()
    with pytest.raises(GraphoptError, match="do not fit"):
        cache.write(rows, 95)


def test_bad_options_are_refused():
    generator = tiny_generator("ort")
    with pytest.raises(OptionError, match="max_new_tokens"):
        generator.generate(PROMPT, max_new_tokens=0)
    with pytest.raises(OptionError, match="top_p"):
        generator.generate(PROMPT, temperature=1.0, top_p=0.0)
    with pytest.raises(GraphoptError, match="no chat template"):
        generator.generate("hi", chat=True)
    with pytest.raises(OptionError, match="seed must be an integer >= 0, got -1"):
        generator.generate(PROMPT, temperature=1.0, seed=-1)
    for threads in (-2, 100_000):  # thousands of onnxruntime threads take minutes to start
        with pytest.raises(OptionError, match=r"threads must be an integer in \[0, \d+\]"):
            Generator.load(tiny_decoder("ort"), threads=threads, log=lambda *_: None)


def test_logits_that_are_not_finite_are_refused_and_a_tiny_temperature_is_greedy():
    """NaN or infinite logits (a broken weight) would give token 0 or a numpy error; a temperature so small that
    logits / T overflows picks the top token."""
    rng = np.random.default_rng(0)
    assert sample_next(np.array([1.0, 3.0, 2.0], np.float32), 1e-320, 1.0, rng) == 1
    for logits, word in (([np.nan, 1.0, 2.0], "NaN"), ([1.0, np.inf, 2.0], "infinity")):
        for temperature in (0.0, 1.0):
            with pytest.raises(GraphoptError, match=f"'logits' hold {word}"):
                sample_next(np.array(logits, np.float32), temperature, 1.0, rng)


@pytest.mark.parametrize("form", FORMS)
def test_a_step_onnxruntime_cannot_run_is_a_named_error(form):
    """A graph that loads but fails while running (onnxruntime's own exception types) is named, not a traceback."""

    class Failing:
        def __getattr__(self, name):
            def fail(*args):
                raise RuntimeError("Non-zero status code returned while running Gather node")
            return fail

    generator = tiny_generator(form)
    decoding = generator.start(32)
    decoding.sessions = {file: Failing() for file in decoding.sessions}
    file = "model.onnx" if form == "ort" else "prefill.onnx"
    with pytest.raises(GraphoptError, match=f"^{file}: onnxruntime failed running a step of 3 token.*Gather node"):
        decoding.feed([1, 2, 3])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("prompt, message", [
    (None, "text or a list of token ids, got NoneType"), (7, "got int"), ([1, True], "got list"),
    ("\udcff", "not valid Unicode text"), ([5, -1], "token id -1 is not in the model's vocabulary"),
    ([10**9], "token id 1000000000 is not in"),
])
def test_bad_prompts_are_refused_by_name(form, prompt, message):
    """Prompts that are neither text nor token ids, text a tokenizer cannot take, and ids outside the
    vocabulary (negative ones would index from the end) get a GraphoptError, not a runtime's error."""
    with pytest.raises(GraphoptError, match=message):
        tiny_generator(form).generate(prompt, max_new_tokens=2)


def test_generate_accepts_a_model_and_a_text_prompt():
    text = bytes(PROMPT).decode()
    result = graphopt.generate(tiny_decoder("ort"), text, max_new_tokens=12, log=lambda *_: None)
    assert result.prompt_tokens == PROMPT and result.tokens == hf_greedy(tiny_hf(), PROMPT, 12)


@pytest.mark.parametrize("form", FORMS)
def test_evaluate_causal_lm_runs_a_decoder_as_prefills(form, tiny_fx):
    windows = lm_windows(None, "eval", 3, 32)
    plain, plain_top = evaluate_causal_lm(tiny_fx, windows)
    lowered = graphopt.lower(tiny_decoder(form), log=lambda *_: None)
    row, _ = evaluate_causal_lm(lowered, windows, plain_top)
    assert row["ppl"] == pytest.approx(plain["ppl"], rel=1e-5) and row["overlap@1"] == 1.0


@pytest.mark.parametrize("form", FORMS)
def test_prefill_chunks_give_their_arena_memory_back(form, monkeypatch):
    """Prefill runs ask onnxruntime to shrink its arena after them; decode steps do not (speed)."""
    import graphopt.evaluation.generation as generation

    seen = []
    real = generation._run_options

    def spy(tokens):
        options = real(tokens)
        seen.append((tokens, options and options.get_run_config_entry("memory.enable_memory_arena_shrinkage")))
        return options

    monkeypatch.setattr(generation, "_run_options", spy)
    result = tiny_generator(form).generate(PROMPT, max_new_tokens=3)
    assert len(result.tokens) == 3
    prefills, steps = [s for n, s in seen if n > 1], [s for n, s in seen if n == 1]
    assert prefills and set(prefills) == {"cpu:0"}  # the prompt's chunks
    assert steps == [None, None]  # two decode steps after the prompt's pick
