"""npu-sim: an integer-only NPU target — compiler, bit-exact simulator and cost model.

emit writes into OUT: program.json + weights.npz (the integer program, compiled for one input
shape), cost.csv + cost.md (per-op cycles, MACs, bytes, SRAM peak on the device profile) and
host_partition.json (every op the NPU could not take: op, node, reason). validate runs the
simulator on the model's sample inputs and compares with onnxruntime on the QDQ model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphopt.backends.npu_sim.compiler import compile_model
from graphopt.backends.npu_sim.cost import estimate, load_profile
from graphopt.backends.npu_sim.program import Program
from graphopt.backends.npu_sim.simulator import Simulator
from graphopt.errors import BackendError, OptionError
from graphopt.files.json_files import write_json
from graphopt.files.writing import OutputSet, atomic_write_text, check_manifest
from graphopt.ir import Model
from graphopt.pipeline.backends import Artifact, Backend, register_backend

__all__ = ["NpuSim", "example_feeds", "compare_outputs"]

DEFAULT_SEQ = 128
MAX_BATCH = 1024  # a simulated NPU runs one batch at a time; these bound what compile allocates
MAX_SEQ_LEN = 1 << 15
MIN_VALID_COSINE = 0.99  # validate fails below this mean cosine against onnxruntime on the QDQ model


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

    Options: batch and seq_len fix the compiled input shape (seq_len 0: the sample input's length);
    profile is a built-in device profile name or a YAML path for the cost model.
    """

    name = "npu-sim"
    batch: int = 1
    seq_len: int = 0
    profile: str = "default"

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.batch <= MAX_BATCH:
            raise OptionError(f"backend 'npu-sim': option 'batch' must be in [1, {MAX_BATCH}], got {self.batch}")
        if not 0 <= self.seq_len <= MAX_SEQ_LEN:
            raise OptionError(f"backend 'npu-sim': option 'seq_len' must be in [0, {MAX_SEQ_LEN}] (0: sample "
                              f"length), got {self.seq_len}")
        load_profile(self.profile)

    def compile(self, model: Model) -> Program:
        feeds = example_feeds(model, self.batch, self.seq_len)
        program = compile_model(model, feeds)
        program.meta["example_inputs"] = {k: v.tolist() for k, v in feeds.items()}
        return program

    def emit(self, model: Model, out_dir: Path, *, force: bool = False) -> Artifact:
        model.require("onnx", "backend 'npu-sim'")
        out_dir = Path(out_dir)
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

    def validate(self, artifact: Artifact, model: Model) -> dict:
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


def _partition_summary(program: Program) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in program.host_partition:
        counts[entry["op"]] = counts.get(entry["op"], 0) + 1
    return counts
