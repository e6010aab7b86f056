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
"""

from __future__ import annotations

import numpy as np

from graphopt.backends.npu_sim.cost import Profile, estimate
from graphopt.backends.npu_sim.program import Program
from graphopt.backends.npu_sim.simulator import Simulator
from graphopt.errors import BackendError
from graphopt.ir.decoder import DecoderSpec, smart_mask

__all__ = ["step_feeds", "step_cost", "ProgramSession", "cost_markdown"]


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
    """A program with onnxruntime's `run(None, feeds)`; `costs` gets `step_cost` of each run, at the
    number of cache slots its attention mask makes visible."""

    def __init__(self, program: Program, profile: Profile, spec: DecoderSpec):
        self.program, self.profile, self.spec = program, profile, spec
        self.simulator = Simulator(program)
        self.totals = estimate(program, profile).totals
        self.costs: list[dict] = []

    def run(self, _names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
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
