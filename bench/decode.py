"""The decode measure: whole decoders (graphopt's, a recipe's, onnxruntime-genai's) generating, side by side.

A decode table's rows build decoder folders: `decoder: {attention, capacity, prefill_chunk}`
(graphopt.load(MODEL, decoder=...) written by save_decoder), `recipe: FILE` (a recipe with a
`decoder:` section, through `graphopt convert` as a user runs it) and `genai: {precision,
extra_options}` (onnxruntime-genai's model builder, offline, on a Hugging Face folder written from
the protocol's model). Every build and every measurement runs in a process of its own, so a row's
peak RSS is its own: `python -m bench.decode build|worker ...`.

Against transformers' fp32 model, run once per table (a prefill, then one token per step with its
DynamicCache; end-of-sequence tokens do not stop it), each row gets:
- greedy agreement on the protocol's prompts: `greedy_prefix` (the share of tokens identical before
  each prompt's first divergence), `greedy_overall` (position by position), `first_divergence`
  (mean tokens before it);
- teacher-forced: fed transformers' greedy tokens, `tf_overlap@1` (its argmax equals transformers'
  next token) and `logits_max_diff` (largest |logit difference| over every step);
- on the prefill protocol's text (the evaluation section's windows, as the quantize suite scores
  prefill graphs): `prefill_overlap@1`, each window as one prompt and its logits at every position,
  and `steps_overlap@1`, the same windows fed one token per decode step, both against transformers'
  argmax over the window; `steps_gap` = |steps - prefill| (None where a runtime gives only the last
  position's logits, as onnxruntime-genai's Generator does);
- speed, rows interleaved round by round (one process per row and round), medians over the rounds:
  `prefill_s` (the protocol's longest context as one prompt), `tok_s@N` (decode tokens/s after a
  prompt of N tokens), `load` (the machine's 1-minute load average before the row's runs);
- `bytes` (graphs and weights on disk), `peak_rss` (the largest of the row's speed processes: the
  runtime, its model, the longest prompt and the decode steps; the fidelity process also maps
  transformers' reference logits, which are not the runtime's memory).
Token ids are fed directly to every runtime (onnxruntime-genai's tokenizer mis-encodes a
tokenizer saved from a GGUF model).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from bench.build import Skipped
from bench.context import Context, package_path
from bench.peers import missing_package
from bench.spec import ROOT, Row, SuiteError, Table
from graphopt.evaluation.generation import peak_rss

__all__ = ["DecoderRow", "Reference", "measure_decode_table", "agreement", "model_bytes", "worker", "peak_rss"]

GENAI = "onnxruntime_genai.models.builder"
PROTOCOL_KEYS = ("corpus", "prompts", "prompt_tokens", "new_tokens", "contexts", "prefill", "steps", "rounds")


@dataclass
class DecoderRow:
    """A built row: its folder, the runtime that runs it ("graphopt" or "genai"), its build seconds."""

    folder: Path
    runtime: str
    seconds: float


@dataclass
class Reference:
    """transformers' fp32 greedy generation of the protocol's prompts, and the speed prompt.
    logits: a .npy file [prompts, new_tokens, vocab], the logits that chose tokens[:, i];
    windows [count, length]: the prefill protocol's evaluation windows, window_top1 transformers'
    argmax at each of their positions."""

    prompts: np.ndarray
    tokens: np.ndarray
    logits: Path
    speed_prompt: np.ndarray
    windows: np.ndarray
    window_top1: np.ndarray


def decode_protocol(ctx: Context) -> dict:
    protocol = ctx.protocol.data.get("decode")
    if not isinstance(protocol, dict) or any(k not in protocol for k in PROTOCOL_KEYS):
        raise SuiteError(f"protocol: a decode table needs a 'decode' section with {', '.join(PROTOCOL_KEYS)}")
    if protocol["prefill"] not in protocol["contexts"]:
        raise SuiteError(f"protocol: decode.prefill ({protocol['prefill']}) must be one of decode.contexts")
    return protocol


# ------------------------------------------------------------------------------ the reference
def transformers_model(source: str, log: Callable) -> tuple[Any, Any]:
    """(transformers model, tokenizer or None for bytes) of a protocol model source: a sample, a
    GGUF file or a Hugging Face folder."""
    from graphopt.frontends import samples
    from graphopt.frontends.huggingface import load_transformers

    if source == "sample:tiny-llama":
        return samples.tiny_llama(log=log), None
    path = samples.smollm2_gguf() if source == "sample:smollm2" else Path(source)
    if path.suffix.lower() == ".gguf":
        hf, tokenizer, _ = load_transformers(path.parent, gguf_file=path.name, log=log, name=path.stem)
    else:
        hf, tokenizer, _ = load_transformers(path, log=log)
    return hf, tokenizer


def make_reference(hf, tokenizer, ctx: Context, folder: Path) -> Reference:
    import torch
    from transformers.cache_utils import DynamicCache

    from graphopt.frontends.corpora import lm_windows

    protocol = decode_protocol(ctx)
    corpus = ctx.protocol["corpora"][protocol["corpus"]]
    split, source = corpus["evaluation_split"], corpus["source"]
    prompts = np.concatenate(lm_windows(tokenizer, split, protocol["prompts"], protocol["prompt_tokens"], corpus=source))
    speed_prompt = lm_windows(tokenizer, split, 1, max(protocol["contexts"]), corpus=source)[0].ravel()
    count, new = len(prompts), protocol["new_tokens"]
    path = folder / "reference-logits.npy"
    logits = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                       shape=(count, new, hf.config.vocab_size))
    tokens = np.zeros((count, new), np.int64)
    torch.set_num_threads(1)  # not timed; on a busy machine torch's spinning threads slow it tenfold
    with torch.no_grad():
        for p, prompt in enumerate(prompts):
            cache, ids = DynamicCache(config=hf.config), prompt.tolist()
            for i in range(new):
                out = hf(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1].float().numpy()
                logits[p, i] = out
                tokens[p, i] = int(out.argmax())
                ids = [int(tokens[p, i])]
        evaluation = ctx.protocol["evaluation"]  # the prefill protocol: its first corpus's windows
        scored = ctx.protocol["corpora"][evaluation["corpora"][0]]
        windows = np.concatenate(lm_windows(tokenizer, scored["evaluation_split"], evaluation["windows"],
                                            evaluation["length"], corpus=scored["source"]))
        window_top1 = np.stack([hf(torch.tensor(w[None])).logits[0].float().numpy().argmax(-1) for w in windows])
    logits.flush()
    del logits
    return Reference(prompts, tokens, path, speed_prompt, windows, window_top1)


def agreement(tokens: np.ndarray, reference: np.ndarray) -> dict:
    """Greedy agreement of generated `tokens` with `reference` ([prompts, new] each): the share of
    tokens identical before each prompt's first divergence, position by position, and the mean
    count of tokens before the first divergence."""
    same = np.asarray(tokens) == np.asarray(reference)
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return {"greedy_prefix": float(prefix.sum() / same.size), "greedy_overall": float(same.mean()),
            "first_divergence": float(prefix.mean())}


def window_overlaps(answer: dict, top1: np.ndarray) -> dict:
    """A fidelity answer's argmax over the prefill protocol's windows, fed as one prompt each
    ("window_prefill", None when the runtime gives only the last position's logits) and one token
    per decode step ("window_steps"), scored against the reference's `top1`; and their gap."""
    steps = float(np.mean(np.array(answer["window_steps"]) == top1))
    if answer["window_prefill"] is None:
        return {"steps_overlap@1": steps, "prefill_overlap@1": None, "steps_gap": None}
    prefill = float(np.mean(np.array(answer["window_prefill"]) == top1))
    return {"steps_overlap@1": steps, "prefill_overlap@1": prefill, "steps_gap": abs(steps - prefill)}


# ---------------------------------------------------------------------------------- building
def write_hf_folder(hf, tokenizer, folder: Path) -> Path:
    """`hf` as a plain Hugging Face folder (float32 safetensors, config, tokenizer) for the genai
    builder; a model transformers loaded from a GGUF file refuses save_pretrained, so its weights
    go into a model built afresh from its config."""
    import transformers

    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = transformers.AutoModelForCausalLM.from_config(config, dtype=hf.dtype)
    clean.load_state_dict(hf.state_dict(), strict=False)
    clean.generation_config = hf.generation_config
    clean.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _run(command: list[str], where: str, what: str, env: dict | None = None) -> tuple[float, str]:
    """Run `command` from the repository root; (seconds, stdout), or SuiteError naming the row."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SuiteError(f"{where}: {what} failed: {tail}")
    return seconds, done.stdout


def build_row(ctx: Context, table: Table, row: Row, folder: Path, hf_folder: Callable[[], Path]) -> DecoderRow:
    """The row's decoder folder in `folder` (see the module docstring); Skipped when it cannot run here."""
    from bench.build import Builder
    from graphopt.errors import RecipeError
    from graphopt.recipe import load_recipe

    where = f"table '{table.name}', row '{row.name}'"
    if row.requires and (reason := missing_package(row.requires)):
        raise Skipped(reason)
    kind, spec = row.build[-1]
    source = package_path(ctx.protocol.model_source(table.model))
    if kind == "decoder":
        command = [sys.executable, "-m", "bench.decode", "build", source, json.dumps(spec or {}), str(folder)]
        return DecoderRow(folder, "graphopt", _run(command, where, "the decoder build")[0])
    if kind == "recipe":
        path = ROOT / "samples" / "recipes" / spec
        if not path.is_file():
            raise Skipped(f"no recipe samples/recipes/{spec} yet")
        if "decoder" not in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}):
            raise SuiteError(f"{where}: recipe {spec} has no decoder: section (a decode row builds a decoder)")
        try:
            recipe = load_recipe(path)
        except RecipeError as exc:
            raise SuiteError(f"{where}: {exc}") from exc
        if recipe.calibration is not None:
            Builder(ctx, table)._check_calibration(recipe, where)
        command = [sys.executable, "-m", "graphopt", "convert", source, "--recipe", str(path), "-o", str(folder)]
        try:
            seconds, _ = _run(command, where, "graphopt convert")
        except SuiteError as exc:  # recorded with its reason; the other rows of the run still count
            raise Skipped(str(exc)) from exc
        return DecoderRow(folder, "graphopt", seconds)
    if kind == "genai":
        if reason := missing_package("onnxruntime_genai"):
            raise Skipped(reason)
        options = [f"{k}={v}" for k, v in (spec.get("extra_options") or {}).items()]
        command = [sys.executable, "-m", GENAI, "-i", str(hf_folder()), "-o", str(folder), "-p",
                   spec.get("precision", "fp32"), "-e", "cpu", "-c", str(folder.parent / "genai-cache")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        try:
            seconds, _ = _run(command + (["--extra_options", *options] if options else []), where,
                              "onnxruntime-genai's builder", env)
        except SuiteError as exc:  # a peer that fails on this model is a finding, not a crash of the run
            raise Skipped(str(exc)) from exc
        return DecoderRow(folder, "genai", seconds)
    raise SuiteError(f"{where}: a decode row is built by decoder, recipe or genai, not {kind}")


def model_bytes(folder: Path) -> int:
    """Bytes of a decoder folder's graphs and weights (tokenizer and configs aside)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))


# --------------------------------------------------------------------------------- measuring
def _worker(row: DecoderRow, task: str, job: dict, where: str) -> dict:
    """One worker process for `row` (see `worker`); its JSON answer."""
    payload = json.dumps({**job, "task": task, "folder": str(row.folder), "runtime": row.runtime})
    _, out = _run([sys.executable, "-m", "bench.decode", "worker", payload], where, f"the {task} run")
    return json.loads(out.strip().splitlines()[-1])


def measure_decode_table(table: Table, ctx: Context, rows: list[Row]) -> dict[str, dict]:
    """Build the table's rows, then measure fidelity row by row and speed in interleaved rounds."""
    protocol = decode_protocol(ctx)
    values: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-decode-") as tmp:
        tmp = Path(tmp)
        ctx.log(f"bench: {table.name}: transformers' greedy reference ...")
        hf, tokenizer = transformers_model(package_path(ctx.protocol.model_source(table.model)), ctx.log)
        reference = make_reference(hf, tokenizer, ctx, tmp)
        hf_folder: list[Path] = []

        def genai_source() -> Path:  # written once, for the first genai row
            if not hf_folder:
                hf_folder.append(write_hf_folder(hf, tokenizer, tmp / "hf"))
            return hf_folder[0]

        built: dict[str, DecoderRow] = {}
        for row in rows:
            ctx.log(f"bench: {table.name}: building {row.name} ...")
            try:
                built[row.name] = build_row(ctx, table, row, tmp / f"row{len(built)}", genai_source)
            except Skipped as exc:
                values[row.name] = {"skipped": str(exc)}
                ctx.log(f"bench: {table.name}: {row.name} skipped: {exc}")
        hf = None  # the reference and the genai folder are made: the float model's memory goes back
        np.save(tmp / "prompts.npy", reference.prompts)
        np.save(tmp / "tokens.npy", reference.tokens)
        np.save(tmp / "speed.npy", reference.speed_prompt)
        np.save(tmp / "windows.npy", reference.windows)
        job = {"threads": ctx.protocol["threads"], "prompts": str(tmp / "prompts.npy"), "tokens": str(tmp / "tokens.npy"),
               "logits": str(reference.logits), "speed": str(tmp / "speed.npy"), "contexts": protocol["contexts"],
               "steps": protocol["steps"], "windows": str(tmp / "windows.npy")}
        rss: dict[str, list[int]] = {name: [] for name in built}
        for name, row in built.items():
            ctx.log(f"bench: {table.name}: fidelity of {name} ...")
            answer = _worker(row, "fidelity", job, f"table '{table.name}', row '{name}'")
            values[name] = {"bytes": model_bytes(row.folder), **agreement(np.array(answer["greedy"]), reference.tokens),
                            "tf_overlap@1": float(np.mean(np.array(answer["top1"]) == reference.tokens)),
                            "logits_max_diff": answer["max_diff"], "build_s": row.seconds,
                            **window_overlaps(answer, reference.window_top1)}
        speed = _speed_rounds(table, ctx, built, job, protocol["rounds"], rss)
        for name in built:
            values[name].update(speed[name])
            values[name]["peak_rss"] = max(rss[name])
    return values


def _speed_rounds(table: Table, ctx: Context, built: dict[str, DecoderRow], job: dict, rounds: int,
                  rss: dict[str, list[int]]) -> dict[str, dict]:
    """Speed of every row, one process per row and round, the rows' order rotated each round;
    medians over the rounds, and the median load average before the row's runs."""
    names = list(built)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    loads: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        ctx.log(f"bench: {table.name}: speed round {r + 1} of {rounds} ...")
        for name in names[r % len(names):] + names[:r % len(names)] if names else []:
            loads[name].append(os.getloadavg()[0])
            answer = _worker(built[name], "speed", job, f"table '{table.name}', row '{name}'")
            rss[name].append(answer["peak_rss"])
            runs[name].append(answer)
    prefill = str(decode_protocol(ctx)["prefill"])
    out = {}
    for name in names:
        values = {f"tok_s@{c}": statistics.median(run["tok_s"][str(c)] for run in runs[name]) for c in job["contexts"]}
        values["prefill_s"] = statistics.median(run["prefill_s"][prefill] for run in runs[name])
        values["load"] = statistics.median(loads[name])
        out[name] = values
    return out


# ----------------------------------------------------------------------- the worker process
class _GraphoptSequence:
    def __init__(self, generator, length: int):
        self.decoding = generator.start(length)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self.decoding.feed(ids, last=True)

    def step(self, token: int) -> np.ndarray:
        return self.decoding.feed([token], last=True)

    def prefill_all(self, ids: np.ndarray) -> np.ndarray:
        return self.decoding.feed(ids)


class _GenaiSequence:
    def __init__(self, model, length: int):
        import onnxruntime_genai as og

        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, do_sample=False)
        self.generator = og.Generator(model, params)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.generator.append_tokens(np.asarray(ids, np.int32))
        return np.asarray(self.generator.get_logits())[0, -1]

    def step(self, token: int) -> np.ndarray:
        return self.prefill(np.array([token]))

    prefill_all = None  # its Generator keeps only the last position's logits


def _opener(runtime: str, folder: str, threads: int) -> Callable[[int], Any]:
    """A function length -> a new sequence of the decoder in `folder` (its cache holds `length` tokens)."""
    if runtime == "genai":
        import onnxruntime_genai as og

        config = og.Config(folder)
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        model = og.Model(config)
        return lambda length: _GenaiSequence(model, length)
    from graphopt.evaluation.generation import Generator

    generator = Generator.load(folder, threads=threads, log=lambda *_: None)
    return lambda length: _GraphoptSequence(generator, length)


def worker(job: dict) -> dict:
    """One row's measurement in this process: "fidelity" (greedy tokens, teacher-forced argmax and
    largest logit difference against the reference) or "speed" (prefill seconds and decode
    tokens/s at each context, after a short warm-up); with the process's peak RSS in bytes."""
    open_sequence = _opener(job["runtime"], job["folder"], job["threads"])
    out: dict[str, Any] = {}
    if job["task"] == "fidelity":
        prompts, tokens = np.load(job["prompts"]), np.load(job["tokens"])
        reference = np.load(job["logits"], mmap_mode="r")
        new = tokens.shape[1]
        greedy, top1, diff = [], [], 0.0
        for p, prompt in enumerate(prompts):
            sequence = open_sequence(len(prompt) + new)
            logits, picked = sequence.prefill(prompt), []
            for i in range(new):
                picked.append(int(np.argmax(logits)))
                if i < new - 1:
                    logits = sequence.step(picked[-1])
            greedy.append(picked)
            sequence = open_sequence(len(prompt) + new)
            logits, chosen = sequence.prefill(prompt), []
            for i in range(new):
                chosen.append(int(np.argmax(logits)))
                diff = max(diff, float(np.abs(logits - reference[p, i]).max()))
                if i < new - 1:
                    logits = sequence.step(int(tokens[p, i]))
            top1.append(chosen)
        out.update(greedy=greedy, top1=top1, max_diff=diff)
        if "windows" in job:
            out.update(_window_runs(open_sequence, np.load(job["windows"])))
    else:
        prompt, steps = np.load(job["speed"]), job["steps"]
        warm = open_sequence(24)
        token = int(np.argmax(warm.prefill(prompt[:16])))
        for _ in range(4):
            token = int(np.argmax(warm.step(token)))
        prefill, rate = {}, {}
        for context in job["contexts"]:
            sequence = open_sequence(context + steps + 1)
            start = time.perf_counter()
            token = int(np.argmax(sequence.prefill(prompt[:context])))
            prefill[str(context)] = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(steps):
                token = int(np.argmax(sequence.step(token)))
            rate[str(context)] = steps / (time.perf_counter() - start)
        out.update(prefill_s=prefill, tok_s=rate)
    out["peak_rss"] = peak_rss()
    return out


def _window_runs(open_sequence: Callable[[int], Any], windows: np.ndarray) -> dict:
    """Argmax at every position of each window: fed as one prompt, and one token per decode step."""
    steps, prefill = [], []
    for window in windows:
        sequence = open_sequence(len(window) + 1)
        row = [int(np.argmax(sequence.prefill(window[:1])))]
        row += [int(np.argmax(sequence.step(int(token)))) for token in window[1:]]
        steps.append(row)
        sequence = open_sequence(len(window) + 1)
        if sequence.prefill_all is not None:
            prefill.append(np.argmax(sequence.prefill_all(window), axis=-1).tolist())
    return {"window_steps": steps, "window_prefill": prefill or None}


def _build_main(source: str, options: str, folder: str) -> None:
    import graphopt
    from graphopt.frontends.decoder_folder import save_decoder

    model = graphopt.load(source, decoder=json.loads(options), log=lambda *_: None)
    save_decoder(model, folder, log=lambda *_: None)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        _build_main(*sys.argv[2:5])
    else:
        print(json.dumps(worker(json.loads(sys.argv[2]))))
