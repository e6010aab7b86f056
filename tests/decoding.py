"""Decoder test helpers: the tiny Llama as decoders of both forms, and transformers' own decoding as the
reference (a prefill, then decode steps with its DynamicCache), checked by one assertion that the
deliberately broken caches of the tests must fail."""

from __future__ import annotations

import functools

import numpy as np

import graphopt
from graphopt.evaluation.generation import Generator
from graphopt.frontends.corpora import lm_windows

__all__ = ["tiny_hf", "tiny_decoder", "tiny_feeds", "tiny_generator", "PROMPT", "hf_step_logits", "step_errors",
           "assert_steps_match", "hf_greedy", "STEP_TOLERANCE", "smollm2_hf"]

STEP_TOLERANCE = 1e-4  # the issue's bound on decode-step logits against transformers'
PROMPT = [int(t) for t in lm_windows(None, "eval", 1, 26)[0].ravel()]  # 26 bytes of pydoc text


def _quiet(*_):
    pass


@functools.cache
def tiny_hf():
    """The trained tiny Llama (transformers), shared read-only."""
    from graphopt.frontends.samples import tiny_llama

    return tiny_llama(log=_quiet)


@functools.cache
def tiny_decoder(form: str, capacity: int = 96, prefill_chunk: int | None = 16):
    """The tiny Llama as a decoder Model (FX form), shared read-only."""
    options = {"attention": form, "capacity": capacity, "prefill_chunk": prefill_chunk}
    return graphopt.load("sample:tiny-llama", decoder=options, log=_quiet)


@functools.cache
def tiny_feeds() -> tuple[list[dict], list[dict]]:
    """Prefill feeds of the tiny ORT-form decoder: 4 calibration windows of 32 tokens, 2 eval windows of 48."""
    from graphopt.frontends.decoder import decoder_feeds

    decoder = tiny_decoder("ort")
    return decoder_feeds(decoder, lm_windows(None, "calib", 4, 32)), decoder_feeds(decoder, lm_windows(None, "eval", 2, 48))


@functools.cache
def tiny_generator(form: str, capacity: int = 96, prefill_chunk: int | None = 16) -> Generator:
    return Generator.load(tiny_decoder(form, capacity, prefill_chunk), threads=1, log=_quiet)


def hf_step_logits(hf, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """transformers' logits for a prefill of `prompt` and then `steps` single-token steps (each
    feeding the previous step's argmax), with its DynamicCache; returns the logits per call and
    the tokens fed after the prompt."""
    import torch
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=hf.config)
    logits, fed, ids = [], [], prompt
    with torch.no_grad():
        for _ in range(steps + 1):
            out = hf(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0].numpy()
            logits.append(out)
            ids = [int(out[-1].argmax())]
            fed += ids
    return logits, fed[:steps]


def step_errors(decoding, prompt: list[int], fed: list[int], reference: list[np.ndarray]) -> list[float]:
    """max |logits - reference| of a decoding fed the prompt, then `fed` one token at a time."""
    errors = [float(np.abs(decoding.feed(prompt) - reference[0]).max())]
    for token, expected in zip(fed, reference[1:]):
        errors.append(float(np.abs(decoding.feed([token]) - expected).max()))
    return errors


def assert_steps_match(decoding, prompt: list[int], fed: list[int], reference: list[np.ndarray]) -> None:
    errors = step_errors(decoding, prompt, fed, reference)
    assert max(errors) <= STEP_TOLERANCE, f"step logits off transformers' by {['%.2g' % e for e in errors]}"


def hf_greedy(hf, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy generation (its own stopping at the config's end-of-sequence ids)."""
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


@functools.cache
def smollm2_hf():
    """SmolLM2-135M-Instruct (transformers, fp32, from the sample's GGUF) and its tokenizer."""
    from graphopt.frontends import samples
    from graphopt.frontends.huggingface import load_transformers

    gguf = samples.smollm2_gguf()
    hf, tokenizer, _ = load_transformers(gguf.parent, gguf_file=gguf.name, log=_quiet, name="smollm2")
    return hf, tokenizer
