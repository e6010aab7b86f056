"""npu-sim for decoders: a prefill and a decode program over a static KV cache, run step by step.

Only the portable form fits an NPU: its graphs have static shapes (prefill S = prefill_chunk,
decode S = 1) over a cache of `capacity` slots. Each graph compiles to its own program.

The cache in the memory model: the cache tensors stay resident in device DRAM between steps (the
host never sends them); a step reads the slots its mask makes visible (the context so far) and
writes the new rows into free slots. `step_cost` adds that traffic, at DRAM bandwidth, to the
cost of the program's ops (`cost.estimate`, which takes the cache inputs as already in place), so
a decode step's cycles and bytes grow with the context while its weights stream stays the same.
`ProgramSession` runs a program where `graphopt.evaluation.generation.Decoding` expects an
onnxruntime session, and records each run's cost at the context its mask shows.

The package (`NpuSim.emit`): `prefix`program.json + weights.npz per graph (`program_prefix`) and
decode_cost.json, which also holds the decoder's spec and its compile-time prompt, so
`read_package` + `program_sessions` + `greedy_steps` run it with nothing but the folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphopt.backends.npu_sim.cost import Profile, estimate
from graphopt.backends.npu_sim.program import Program
from graphopt.backends.npu_sim.simulator import Simulator
from graphopt.errors import BackendError, OptionError
from graphopt.evaluation.generation import Decoding
from graphopt.files.reading import read_json, want_dict, want_int, want_list
from graphopt.files.writing import check_manifest
from graphopt.ir.decoder import DecoderSpec, smart_mask
from graphopt.lowering.decoder import graph_files

__all__ = ["step_feeds", "step_cost", "ProgramSession", "cost_markdown", "program_prefix", "program_sessions",
           "is_package", "read_package", "greedy_steps", "PACKAGE_INDEX"]

PACKAGE_INDEX = "decode_cost.json"  # a decoder package's per-token costs, spec and compile-time prompt
PROGRAM_FILES = ("program.json", "weights.npz")
MAX_INDEX_BYTES = 1 << 24
SUMMED = ("cycles", "cache_cycles", "time_ms", "cache_read_bytes", "cache_write_bytes", "bytes_moved")


def step_feeds(spec: DecoderSpec, ids: np.ndarray, seq: int) -> dict[str, np.ndarray]:
    """Feeds of a step of `seq` new rows (the first of them `ids`, the rest padding) from an empty cache."""
    padded = np.zeros((1, seq), np.int64)
    ids = np.asarray(ids, np.int64).reshape(-1)[:seq]
    padded[0, :ids.size] = ids
    feeds = {"input_ids": padded, "position_ids": np.arange(seq, dtype=np.int64)[None],
             "attention_mask": smart_mask(np.zeros(spec.capacity, bool), seq, spec.mask_value)}
    past = np.zeros((1, spec.kv_heads, spec.capacity, spec.head_dim), np.float32)
    return {**feeds, **{name: past for name in spec.past_names}}


def step_cost(program: Program, profile: Profile, spec: DecoderSpec, context: int, new_rows: int = 1,
              totals: dict | None = None) -> dict:
    """Cost of one run of `program` that sees `context` cache slots and writes `new_rows` rows:
    the program's ops (`totals`: `estimate(program, profile).totals`, computed when not given)
    plus the cache's DRAM traffic (every layer's key and value rows, in the dtype the program
    reads the cache in)."""
    totals = totals or estimate(program, profile).totals
    itemsize = np.dtype(program.tensors[spec.past_names[0]].dtype).itemsize
    row = spec.kv_heads * spec.head_dim * itemsize * len(spec.past_names)  # one token's rows, all layers
    reads, writes = context * row, new_rows * row
    cache_cycles = int(np.ceil((reads + writes) / profile.data["dram_bytes_per_cycle"]))
    cycles = totals["cycles"] + cache_cycles
    return {"context": int(context), "cycles": int(cycles), "cache_cycles": cache_cycles,
            "time_ms": cycles / totals["clock_hz"] * 1e3, "weight_bytes": int(totals["weight_bytes"]),
            "cache_read_bytes": int(reads), "cache_write_bytes": int(writes),
            "bytes_moved": int(totals["dram_read"] + totals["dram_write"] + reads + writes)}


class ProgramSession:
    """A program with onnxruntime's `run(None, feeds[, run_options])` (run options, which tune
    onnxruntime's memory, mean nothing here); `costs` gets `step_cost` of each run, at the number of
    cache slots its attention mask makes visible."""

    def __init__(self, program: Program, profile: Profile, spec: DecoderSpec):
        self.program, self.profile, self.spec = program, profile, spec
        self.simulator = Simulator(program)
        self.totals = estimate(program, profile).totals
        self.costs: list[dict] = []

    def run(self, _names, feeds: dict[str, np.ndarray], _run_options=None) -> list[np.ndarray]:
        if set(feeds) != set(self.program.inputs):
            raise BackendError(f"npu-sim: program '{self.program.name}' takes {', '.join(self.program.inputs)}")
        outputs = self.simulator.run(feeds)
        mask = feeds["attention_mask"]
        seq = mask.shape[2]
        context = int(np.sum(mask[0, 0, 0, :self.spec.capacity] == 0))
        self.costs.append(step_cost(self.program, self.profile, self.spec, context, seq, self.totals))
        return outputs


def cost_markdown(name: str, profile: str, rows: list[dict]) -> str:
    """The per-token table of a decode program at several contexts."""
    lines = [f"# npu-sim decode cost per token: {name} ({profile})", "",
             "| context | cycles | time (ms) | cache cycles | weights (B) | cache read (B) | cache write (B) | "
             "bytes moved |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['cycles']:,} | {r['time_ms']:.4f} | {r['cache_cycles']:,} | "
              f"{r['weight_bytes']:,} | {r['cache_read_bytes']:,} | {r['cache_write_bytes']:,} | "
              f"{r['bytes_moved']:,} |" for r in rows]
    return "\n".join(lines) + "\n"


def program_prefix(file: str) -> str:
    """The prefix of graph `file`'s program files in a decoder package (prefill.onnx: "prefill.")."""
    return f"{Path(file).stem}."


def program_sessions(folder: str | Path, profile: Profile, spec: DecoderSpec) -> dict[str, ProgramSession]:
    """A `ProgramSession` of each program of a decoder package, by its graph's file name."""
    return {file: ProgramSession(Program.load(folder, program_prefix(file)), profile, spec) for file in graph_files(spec)}


def is_package(folder: str | Path) -> bool:
    """Whether `folder` holds a decoder's programs (its index or a prefixed program) and no single program."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "program.json").exists():
        return False
    return (folder / PACKAGE_INDEX).exists() or any(folder.glob("*.program.json"))


def read_package(folder: str | Path) -> tuple[DecoderSpec, list[int]]:
    """The spec and compile-time prompt of the decoder package in `folder`, after checking that its
    index and every program file are there and are the files its manifest recorded (one run's).
    A missing or malformed file is a BackendError naming it."""
    folder = Path(folder)
    index = folder / PACKAGE_INDEX
    if not index.is_file():
        raise BackendError(f"{index}: missing: {folder} holds decoder programs but not the index npu-sim writes "
                           "beside them; emit the package again")
    data = want_dict(read_json(index, max_bytes=MAX_INDEX_BYTES, error=BackendError, what="npu-sim decoder index"),
                     str(index), BackendError)
    if "decoder" not in data:
        raise BackendError(f"{index}: no 'decoder' spec (written by an older graphopt); emit the package again")
    spec = DecoderSpec.from_json(data["decoder"], f"{index}: 'decoder'", BackendError)
    if spec.form != "portable":
        raise BackendError(f"{index}: 'decoder': form {spec.form!r}; an npu-sim package holds a portable decoder")
    names = [f"{program_prefix(file)}{name}" for file in graph_files(spec) for name in PROGRAM_FILES]
    for name in names:
        if not (folder / name).is_file():
            raise BackendError(f"{folder / name}: missing from the npu-sim decoder package {folder}; emit it again")
    check_manifest(folder, [PACKAGE_INDEX, *names])
    prompt = want_list(data.get("prompt", []), f"{index}: 'prompt'", BackendError, max_len=spec.capacity)
    return spec, [want_int(t, f"{index}: 'prompt' entry {i}", BackendError, lo=0, hi=spec.vocab - 1)
                  for i, t in enumerate(prompt)]


def greedy_steps(spec: DecoderSpec, sessions: dict, prompt: list[int], steps: int) -> tuple[list[dict], np.ndarray]:
    """A prefill of `prompt` and `steps` greedy decode steps, each feeding the token the step before
    chose, through `sessions` (file name -> `ProgramSession`) with one static cache carried between
    them by `Decoding`, as validation runs them. Returns a row per step (what it fed, the token it
    chose, the cache slots its first run saw, how many program runs it took and their summed cost)
    and the logits each token was chosen from [steps + 1, vocab]."""
    if not prompt:
        raise OptionError("the prompt has no token ids")
    if len(prompt) + steps > spec.capacity:
        raise OptionError(f"a prompt of {len(prompt)} tokens and {steps} decode steps do not fit the decoder's "
                          f"cache of {spec.capacity} slots; use fewer steps or a shorter prompt")
    bad = [t for t in prompt if not 0 <= t < spec.vocab]
    if bad:
        raise OptionError(f"token id {bad[0]} is outside the decoder's vocabulary of {spec.vocab}")
    decoding = Decoding(spec, sessions, len(prompt) + steps)
    rows, logits, ids = [], [], [int(t) for t in prompt]
    for index in range(steps + 1):
        marks = {file: len(session.costs) for file, session in sessions.items()}
        logits.append(decoding.feed(ids, last=True))
        runs = [cost for file, session in sessions.items() for cost in session.costs[marks[file]:]]
        rows.append({"step": f"decode {index}" if index else "prefill", "fed": len(ids),
                     "token": int(np.argmax(logits[-1])), "context": runs[0]["context"], "runs": len(runs),
                     **{key: sum(run[key] for run in runs) for key in SUMMED}})
        ids = [rows[-1]["token"]]
    return rows, np.stack(logits)
