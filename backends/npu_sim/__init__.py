"""npu-sim: an integer-only NPU target — compiler, bit-exact simulator and cost model.

emit writes into OUT: program.json + weights.npz (the integer program, compiled for one input
shape), cost.csv + cost.md (per-op cycles, MACs, bytes, SRAM peak on the device profile) and
host_partition.json (every op the NPU could not take: op, node, reason). validate runs the
simulator on the model's sample inputs and compares with onnxruntime on the QDQ model.

A portable decoder compiles to prefill.* and decode.* (each such a set of files) and decode_cost.{json,md}:
the per-token cost of a decode step at several contexts, with the KV cache resident in the memory
model (`graphopt.backends.npu_sim.decoder`); the JSON also holds the decoder's spec and compile-time
prompt, so the folder runs on its own. validate runs a prefill and decode steps in the
simulator, each program fed by the host's static cache, against onnxruntime on the same graphs.
`simulate` runs an emitted folder of either kind: one program on its feeds, or a decoder's prefill
and greedy decode steps with their per-step cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphopt.backends.npu_sim.compiler import compile_model
from graphopt.backends.npu_sim.cost import estimate, load_profile
from graphopt.backends.npu_sim.decoder import (
    PACKAGE_INDEX,
    cost_markdown,
    greedy_steps,
    is_package,
    program_prefix,
    program_sessions,
    read_package,
    step_cost,
    step_feeds,
)
from graphopt.backends.npu_sim.program import Program
from graphopt.backends.npu_sim.simulator import Simulator
from graphopt.errors import BackendError, OptionError
from graphopt.files.json_files import write_json
from graphopt.files.writing import OutputSet, atomic_write_text, check_manifest
from graphopt.ir import Model
from graphopt.lowering.decoder import graph_files
from graphopt.pipeline.backends import (
    Artifact,
    Backend,
    decoder_graphs,
    decoder_steps,
    register_backend,
    require_portable,
    validation_feeds,
)

__all__ = ["NpuSim", "example_feeds", "compare_outputs"]

DEFAULT_SEQ = 128
MAX_BATCH = 1024  # a simulated NPU runs one batch at a time; these bound what compile allocates
MAX_SEQ_LEN = 1 << 15
MIN_VALID_COSINE = 0.99  # validate fails below this mean cosine against onnxruntime on the QDQ model
DECODE_STEPS = 8  # greedy decode steps `simulate` runs after a decoder's prefill by default


def _fit(array: np.ndarray, batch: int, seq: int) -> np.ndarray:
    """`array` with `batch` rows and (for 2-D and more) `seq` columns, by cutting or repeating."""
    array = np.asarray(array)
    rows = np.resize(array, (batch,) + array.shape[1:]) if array.shape[0] != batch else array
    if rows.ndim < 2 or not seq or rows.shape[1] == seq:
        return np.ascontiguousarray(rows)
    reps = -(-seq // rows.shape[1])
    return np.ascontiguousarray(np.concatenate([rows] * reps, axis=1)[:, :seq])


def example_feeds(model: Model, batch: int = 1, seq_len: int = 0, feeds: dict | None = None) -> dict[str, np.ndarray]:
    """Feeds of shape [batch, seq_len] built from `feeds` or the model's first sample input (zeros if none)."""
    source = feeds or (model.sample_inputs[0] if model.sample_inputs else None)
    out = {}
    for spec in model.inputs:
        if source is not None and spec.name in source:
            out[spec.name] = _fit(source[spec.name], batch, seq_len)
            continue
        shape = [batch if i == 0 else (seq_len or DEFAULT_SEQ) if isinstance(d, str) else d
                 for i, d in enumerate(spec.shape)]
        out[spec.name] = np.ones(shape, dtype=spec.dtype) if "mask" in spec.name else np.zeros(shape, dtype=spec.dtype)
    return out


def compare_outputs(sim: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean cosine over the last axis, max |difference|."""
    a = np.asarray(sim, np.float64).reshape(-1, sim.shape[-1])
    b = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1])
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cosine = np.sum(a * b, axis=-1) / np.maximum(norms, 1e-30)
    return {"top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))), "cosine": float(np.mean(cosine)),
            "max_abs_diff": float(np.max(np.abs(a - b)))}


@register_backend
@dataclass(frozen=True)
class NpuSim(Backend):
    """Integer-only NPU: int8 tensors, int32 accumulators, fixed-point requantization, LUTs; host fallback.

    Options: batch and seq_len fix the compiled input shape (seq_len 0: the sample input's length;
    a decoder's shapes are its graphs'); profile is a built-in device profile name or a YAML path
    for the cost model; decode_contexts are the contexts a decoder's per-token cost is reported at.
    """

    name = "npu-sim"
    batch: int = 1
    seq_len: int = 0
    profile: str = "default"
    decode_contexts: tuple[int, ...] = field(default=(), metadata={
        "help": "decoder: cache slots seen by the decode steps costed (default: 16, 64, 256, ... below the capacity)"})

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.batch <= MAX_BATCH:
            raise OptionError(f"backend 'npu-sim': option 'batch' must be in [1, {MAX_BATCH}], got {self.batch}")
        if not 0 <= self.seq_len <= MAX_SEQ_LEN:
            raise OptionError(f"backend 'npu-sim': option 'seq_len' must be in [0, {MAX_SEQ_LEN}] (0: sample "
                              f"length), got {self.seq_len}")
        load_profile(self.profile)
        if any(c < 0 for c in self.decode_contexts):
            raise OptionError(f"backend 'npu-sim': option 'decode_contexts' takes numbers of cache slots >= 0, "
                              f"got {list(self.decode_contexts)}")

    def compile(self, model: Model) -> Program:
        feeds = example_feeds(model, self.batch, self.seq_len)
        program = compile_model(model, feeds)
        program.meta["example_inputs"] = {k: v.tolist() for k, v in feeds.items()}
        return program

    def emit(self, model: Model, out_dir: Path, *, force: bool = False) -> Artifact:
        model.require("onnx", "backend 'npu-sim'")
        out_dir = Path(out_dir)
        graphs = decoder_graphs(model)
        if graphs is not None:
            return self._emit_decoder(model, graphs, out_dir, force)
        names = ["program.json", "weights.npz", "cost.csv", "cost.md", "host_partition.json"]
        program = self.compile(model)
        report = estimate(program, load_profile(self.profile))
        with OutputSet(out_dir, inputs=[model.source], force=force) as out:
            program.save(out.staging)
            atomic_write_text(out.path("cost.csv"), report.to_csv())
            atomic_write_text(out.path("cost.md"), report.to_markdown())
            write_json(out.path("host_partition.json"), program.host_partition)
        return Artifact(self.name, out_dir, [out_dir / n for n in names], report={
            "npu_ops": program.count("npu"), "host_ops": program.count("host"), "cost": report.totals,
            "host_partition": _partition_summary(program)})

    def _contexts(self, capacity: int) -> list[int]:
        if not self.decode_contexts:
            return [4 ** k for k in range(2, 16) if 4 ** k < capacity]
        over = [c for c in self.decode_contexts if c >= capacity]
        if over:
            raise OptionError(f"backend 'npu-sim': option 'decode_contexts': a decode step sees at most "
                              f"{capacity - 1} cache slots (the decoder's capacity is {capacity}), got {over[0]}")
        return sorted(set(self.decode_contexts))

    def _emit_decoder(self, model: Model, graphs, out_dir: Path, force: bool) -> Artifact:
        """prefill.* and decode.* programs with their cost reports, and decode_cost.{json,md}."""
        spec = graphs.spec
        require_portable(spec, self.name, model.name)
        contexts = self._contexts(spec.capacity)
        ids = validation_feeds(model)[0][0]["input_ids"]
        prompt = np.asarray(ids, np.int64).reshape(-1)[:spec.prefill_chunk]  # the prefill example's tokens
        profile = load_profile(self.profile)
        programs, reports = {}, {}
        for file, seq in graph_files(spec).items():
            feeds = step_feeds(spec, ids, seq)
            programs[file] = compile_model(graphs.model(file, f"{model.name}/{file}"), feeds)
            programs[file].meta["example_inputs"] = {k: v.tolist() for k, v in feeds.items()}
            reports[file] = estimate(programs[file], profile)
        decode = programs["decode.onnx"]
        per_token = [step_cost(decode, profile, spec, c, totals=reports["decode.onnx"].totals) for c in contexts]
        files = []
        with OutputSet(out_dir, inputs=[model.source], force=force) as out:
            for file, program in programs.items():
                prefix = program_prefix(file)
                program.save(out.staging, prefix)
                atomic_write_text(out.path(f"{prefix}cost.csv"), reports[file].to_csv())
                atomic_write_text(out.path(f"{prefix}cost.md"), reports[file].to_markdown())
                write_json(out.path(f"{prefix}host_partition.json"), program.host_partition)
                files += [out_dir / f"{prefix}{n}" for n in ("program.json", "weights.npz", "cost.csv", "cost.md",
                                                               "host_partition.json")]
            write_json(out.path(PACKAGE_INDEX), {"profile": profile.name, "per_token": per_token,
                                                 "decoder": spec.to_json(), "prompt": prompt.tolist()})
            atomic_write_text(out.path("decode_cost.md"), cost_markdown(model.name, profile.name, per_token))
            files += [out_dir / PACKAGE_INDEX, out_dir / "decode_cost.md"]
        return Artifact(self.name, out_dir, files, report={
            "graphs": {file: {"npu_ops": p.count("npu"), "host_ops": p.count("host"), "cost": reports[file].totals,
                              "host_partition": _partition_summary(p)} for file, p in programs.items()},
            "decode_per_token": per_token})

    def _validate_decoder(self, artifact: Artifact, model: Model, graphs) -> dict:
        """A prefill and decode steps in the simulator against onnxruntime on the same graphs."""
        spec = graphs.spec
        require_portable(spec, self.name, model.name)
        profile = load_profile(self.profile)
        sims = program_sessions(artifact.out_dir, profile, spec)
        start = time.perf_counter()
        pairs = decoder_steps(spec, graphs.sessions(), sims, model)
        seconds = time.perf_counter() - start
        steps = {label: compare_outputs(sim, ref) for label, ref, sim in pairs}
        cosine = float(np.mean([s["cosine"] for s in steps.values()]))
        tokens = [(int(np.argmax(ref[-1])), int(np.argmax(sim[-1]))) for _, ref, sim in pairs]
        found = {"steps": steps, "cosine": cosine, "top1_agreement": float(np.mean([a == b for a, b in tokens])),
                 "tokens_onnxruntime": [a for a, _ in tokens], "tokens_npu_sim": [b for _, b in tokens],
                 "decode_costs": sims["decode.onnx"].costs, "simulate_s": seconds}
        if cosine < MIN_VALID_COSINE:
            raise BackendError(f"npu-sim: decoder '{model.name}': simulator logits differ from onnxruntime on the "
                               f"QDQ graphs over a prefill and {len(pairs) - 1} decode steps "
                               f"(mean cosine {cosine:.4f} < {MIN_VALID_COSINE})")
        return found

    def validate(self, artifact: Artifact, model: Model) -> dict:
        graphs = decoder_graphs(model)
        if graphs is not None:
            return self._validate_decoder(artifact, model, graphs)
        program = Program.load(artifact.out_dir)
        simulator = Simulator(program)
        session = model.session()
        results, seconds = [], 0.0
        shape = program.tensors[program.inputs[0]].shape
        batch, seq = shape[0], (shape[1] if len(shape) > 1 else 0)
        for sample in model.sample_inputs or [None]:
            feeds = example_feeds(model, batch, seq, sample)
            start = time.perf_counter()
            sim = simulator.run(feeds)[0]
            seconds += time.perf_counter() - start
            ref = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
            results.append(compare_outputs(sim, ref))
        found = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
        found["max_abs_diff"] = max(r["max_abs_diff"] for r in results)
        found.update(samples=len(results), simulate_s=seconds)
        if found["cosine"] < MIN_VALID_COSINE:
            raise BackendError(f"npu-sim: simulator output differs from onnxruntime on the QDQ model "
                               f"(mean cosine {found['cosine']:.4f} < {MIN_VALID_COSINE})")
        return found

    def simulate(self, folder: str | Path, feeds: dict[str, np.ndarray] | None = None) -> dict:
        """Run an emitted program folder on `feeds` (default: its compile-time example) and cost it
        on this backend's profile: {"program", "outputs" (by name), "simulate_s", NPU/host op
        counts, "profile" name, "cost" totals}. What `graphopt simulate` prints. A folder whose
        program.json and weights.npz come from two different runs is refused (its manifest)."""
        if Path(folder).is_dir():
            check_manifest(folder, ["program.json", "weights.npz"])
        program = Program.load(folder)
        if feeds is None:
            feeds = {k: np.array(v) for k, v in program.meta.get("example_inputs", {}).items()}
        profile = load_profile(self.profile)
        start = time.perf_counter()
        outputs = Simulator(program).run(feeds)
        return {"program": program, "outputs": dict(zip(program.output_names, outputs)),
                "simulate_s": time.perf_counter() - start, "npu_ops": program.count("npu"),
                "host_ops": program.count("host"), "profile": profile.name, "cost": estimate(program, profile).totals}

    def simulate_decoder(self, folder: str | Path, prompt: list[int] | None = None,
                         steps: int = DECODE_STEPS) -> dict:
        """Run an emitted decoder package: a prefill of `prompt` (default: the package's compile-time
        prompt) and `steps` greedy decode steps, the cache carried between them as validation
        carries it, each step costed on this backend's profile. Returns {"package", "profile",
        "prompt", "tokens" (one per step), "steps" (per step: token, context, cycles, time_ms,
        bytes_moved, ...; `decoder.greedy_steps`), "totals", "simulate_s", "logits" [steps + 1,
        vocab]}. A package missing a file, or whose files come from two runs, is refused."""
        spec, example = read_package(folder)
        profile = load_profile(self.profile)
        sessions = program_sessions(folder, profile, spec)
        prompt = example if prompt is None else [int(t) for t in prompt]
        start = time.perf_counter()
        rows, logits = greedy_steps(spec, sessions, prompt, steps)
        seconds = time.perf_counter() - start
        totals = {key: sum(row[key] for row in rows) for key in ("cycles", "time_ms", "bytes_moved")}
        return {"package": str(folder), "profile": profile.name, "prompt": prompt,
                "tokens": [row["token"] for row in rows], "steps": rows, "totals": totals, "simulate_s": seconds,
                "logits": logits}

    @staticmethod
    def is_decoder_package(folder: str | Path) -> bool:
        """Whether `folder` is an emitted decoder package (run it with `simulate_decoder`)."""
        return is_package(folder)


def _partition_summary(program: Program) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in program.host_partition:
        counts[entry["op"]] = counts.get(entry["op"], 0) + 1
    return counts
