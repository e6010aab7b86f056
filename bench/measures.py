"""The measurements a table names: lm, embedding, image, backend, npu-cost. One function each, one row each.

Every metric comes from graphopt.evaluation (`benchmark_causal_lm`, `evaluate_causal_lm`,
`metrics`, `ort_latency`, `disk_bytes`); this module only decides what runs on which runtime and
against which row. `State` carries, within one table, what later rows are compared with: each
row's top-k indices per corpus, its first windows' logits (for SQNR) and its embedding outputs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench.build import Built
from bench.context import Context
from bench.spec import Row, Table
from graphopt.evaluation import metrics
from graphopt.evaluation.latency import ort_latency
from graphopt.evaluation.lm import benchmark_causal_lm, evaluate_causal_lm
from graphopt.evaluation.sizes import disk_bytes
from graphopt.ir import Model
from graphopt.ir.runtime import ort_session

__all__ = ["State", "MEASURES", "paired_latency"]


@dataclass
class State:
    """What the rows of one table measured so far, for the rows compared with them."""

    reference: str
    compared: set[str] = field(default_factory=set)  # rows other rows are compared with
    tops: dict[tuple[str, str], list[np.ndarray]] = field(default_factory=dict)  # (row, corpus) -> top-k
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # row -> first windows' logits
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # row -> embedding outputs per batch
    models: dict[str, Model] = field(default_factory=dict)  # the reference row's model, for paired latency

    def against(self, row: Row) -> list[str]:
        """The rows `row` is compared with, the first one primary (default: the table's reference)."""
        if row.against:
            return list(row.against)
        return [] if row.reference else [self.reference]


def _runner(model: Model, runtime: str, ctx: Context, timings: list[float]) -> Callable:
    """A callable feeds-or-ids -> outputs for `runtime`; npu-sim appends its seconds per run."""
    threads = ctx.protocol["threads"]
    if runtime == "npu-sim":
        from graphopt.backends.npu_sim.compiler import compile_model
        from graphopt.backends.npu_sim.simulator import Simulator

        programs: dict = {}

        def simulate(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            key = tuple(sorted((k, v.shape) for k, v in feeds.items()))
            if key not in programs:
                programs[key] = Simulator(compile_model(model, feeds))
            start = time.perf_counter()
            out = programs[key].run(feeds)
            timings.append(time.perf_counter() - start)
            return out

        return simulate
    if runtime == "torch":
        return model.runner(threads)
    sessions: list = []  # made on first use: rows measured by benchmark_causal_lm may never need it

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not sessions:
            sessions.append(ort_session(model.to_onnx(), threads=threads, consume=True,
                                        optimization="basic" if runtime == "ort-basic" else "all"))
        return sessions[0].run(None, feeds)

    return run


def _top1(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Top-1 agreement of two runs' top-k indices (position 0 is each run's argmax)."""
    return float(np.mean([np.mean(x[..., 0] == y[..., 0]) for x, y in zip(a, b)]))


# ------------------------------------------------------------------------------------ lm
def measure_lm(table: Table, row: Row, built: Built, ctx: Context, state: State) -> dict:
    """ppl and overlap@1/@k on every evaluation corpus, SQNR of the first windows' logits, and
    (ORT rows, unless the table's options say `latency: false`) bytes, params and latency."""
    ev, lat = ctx.protocol["evaluation"], ctx.protocol["latency"]
    model = built.variants.get("torch", built.model) if row.runtime == "torch" else built.model
    against, timings, out = state.against(row), [], {}
    run = _runner(model, row.runtime, ctx, timings)
    name = model.inputs[0].name
    logits_of = lambda ids: run({name: ids})[0]  # noqa: E731
    for index, corpus in enumerate(ctx.protocol.corpora):
        windows = ctx.evaluation_windows(model, corpus)
        reference = state.tops.get((against[0], corpus)) if against else None
        suffix = "" if index == 0 else f"[{corpus}]"
        if index == 0 and row.runtime in ("ort", "ort-basic") and table.options.get("latency", True):
            values, tops = benchmark_causal_lm(
                model, windows, reference, k=ev["top_k"], latency_seq=lat["seq"], latency_repeats=lat["repeats"],
                threads=ctx.protocol["threads"], optimization="basic" if row.runtime == "ort-basic" else "all")
        else:
            values, tops = evaluate_causal_lm(logits_of, windows, reference, k=ev["top_k"])
        out.update({f"{key}{suffix}": value for key, value in values.items()})
        for other in against[1:]:
            out[f"overlap@1 vs {other}{suffix}"] = _top1(tops, state.tops[(other, corpus)])
        state.tops[(row.name, corpus)] = tops
        if index and "overlap@1" in out:
            out[f"overlap@1 gap{suffix}"] = out["overlap@1"] - out[f"overlap@1{suffix}"]
    if timings:
        out["sim_s_per_window"] = statistics.median(timings)
    primary = ctx.evaluation_windows(model, ctx.protocol.corpora[0])
    if "sqnr_db" in table.columns:
        logits = np.asarray(logits_of(np.concatenate(primary[:ev["sqnr_windows"]])), dtype=np.float32)
        if against:
            out["sqnr_db"] = metrics.sqnr_db(state.logits[against[0]], logits)
        if row.name in state.compared:  # 25 MB a SmolLM2 window: kept only for the rows others compare with
            state.logits[row.name] = logits
    if "torch" in built.variants and row.runtime != "torch" and table.options.get("torch_columns"):
        reference = state.tops.get((against[0], ctx.protocol.corpora[0])) if against else None
        torch_values, _ = evaluate_causal_lm(built.variants["torch"], primary, reference, k=ev["top_k"])
        out.update({f"torch_{key}": value for key, value in torch_values.items()})
    _paired(table, row, model, state, ctx, out, {name: primary[0][:1, :lat["seq"]]})
    return out


# ----------------------------------------------------------------------------- embedding
def measure_embedding(table: Table, row: Row, built: Built, ctx: Context, state: State) -> dict:
    """Mean and smallest per-batch cosine of the output against the compared row's (per sentence,
    averaged in a batch), bytes, params, and (ORT rows) latency of the first batch."""
    return _output_cosines(table, row, built, ctx, state, ctx.embedding_batches(built.model, "evaluation"), -1)


def measure_image(table: Table, row: Row, built: Built, ctx: Context, state: State) -> dict:
    """Mean and smallest per-image cosine of the whole output against the compared row's, on the
    protocol's held-out images (`min_batch_cosine`: the worst image), bytes, params, and (ORT rows)
    latency of the first image."""
    return _output_cosines(table, row, built, ctx, state, ctx.image_feeds(built.model, "evaluation"), None)


def _output_cosines(table: Table, row: Row, built: Built, ctx: Context, state: State, batches: list[dict],
                    axis: int | None) -> dict:
    model, timings = built.model, []
    run = _runner(model, row.runtime, ctx, timings)
    outputs = [np.asarray(run(b)[0]) for b in batches]
    state.outputs[row.name] = outputs
    out: dict = {}
    against = state.against(row)
    if against:
        cosines = [metrics.cosine(ref, o, axis=axis) for ref, o in zip(state.outputs[against[0]], outputs)]
        out.update({"cosine": float(np.mean(cosines)), "min_batch_cosine": float(np.min(cosines))})
    if timings:
        out["sim_s_per_batch"] = statistics.median(timings)
    if row.runtime in ("ort", "ort-basic"):
        out.update({"bytes": disk_bytes(model), "params": model.num_params()})
        if table.options.get("latency", True):
            latency = ort_latency(model, batches[0], ctx.protocol["latency"]["repeats"],
                                  warmup=ctx.protocol["latency"]["warmup"], threads=ctx.protocol["threads"])
            out.update({"latency_ms": latency["median_ms"], "latency_min_ms": latency["min_ms"]})
    _paired(table, row, model, state, ctx, out, batches[0])
    return out


def _paired(table: Table, row: Row, model: Model, state: State, ctx: Context, out: dict, feeds: dict) -> None:
    """`paired_latency_ratio` against the reference row, when the table asks for it."""
    if not table.options.get("paired_latency"):
        return
    if row.reference:
        state.models[row.name] = model
        return
    paired = paired_latency(state.models[state.reference], model, feeds, rounds=ctx.protocol["latency"]["paired_rounds"],
                            threads=ctx.protocol["threads"])
    out["paired_latency_ratio"] = paired["ratio_median"]


def paired_latency(dense: Model, other: Model, feeds: dict, *, rounds: int = 20, threads: int = 0) -> dict:
    """ORT latency of two models run alternately, so that load from other processes hits both alike.

    Returns each model's minimum and median in ms, and the median over rounds of other/dense.
    """
    sessions = [ort_session(m.to_onnx(), threads=threads, consume=True) for m in (dense, other)]
    models, times = (dense, other), ([], [])
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            timing = ort_latency(models[i], feeds, 1, warmup=2 if r < 2 else 0, session=sessions[i])
            times[i].append(timing["min_ms"])
    return {"dense_min_ms": min(times[0]), "other_min_ms": min(times[1]),
            "dense_median_ms": statistics.median(times[0]), "other_median_ms": statistics.median(times[1]),
            "ratio_median": statistics.median(p / d for d, p in zip(*times)), "rounds": rounds}


# ------------------------------------------------------------------------------- backend
def measure_backend(table: Table, row: Row, built: Built, ctx: Context, state: State) -> dict:
    """Emit the row's model with its backend and validate it as `graphopt convert` does."""
    from graphopt.pipeline import export

    with tempfile.TemporaryDirectory(prefix="graphopt-bench-backend-") as tmp:
        start = time.perf_counter()
        artifact = export(built.model, row.backend, Path(tmp), {"usability": False} if row.backend == "ort-mobile" else {})
        seconds = time.perf_counter() - start
        sizes = {p.name: p.stat().st_size for p in artifact.files if p.exists()}
    main = "model.ort" if row.backend == "ort-mobile" else "model.encodings"
    v, report = artifact.validation, artifact.report
    out = {"backend": row.backend, "bytes": sum(sizes.values()), "main_file_bytes": sizes.get(main, 0),
           "emit_validate_s": seconds}
    if row.backend == "ort-mobile":
        out["check"] = ("exact" if v["exact_required"] and v["max_abs_diff"] == 0
                        else f"max diff {v['max_abs_diff']:.1e}")
    else:
        out.update({"check": "identical" if v["identical"] else "differs", "entries": v.get("entries"),
                    "htp_rejects": report["htp"]["rejects"], "gmacs": report["macs_per_inference"] / 1e9})
    return out


# ------------------------------------------------------------------------------ npu-cost
def measure_npu_cost(table: Table, row: Row, built: Built, ctx: Context, state: State) -> dict:
    """The npu-sim cost model's totals for one prefill of `latency.seq` tokens, and cycles per kernel."""
    from graphopt.backends.npu_sim import NpuSim
    from graphopt.backends.npu_sim.cost import estimate, load_profile

    program = NpuSim(seq_len=ctx.protocol["latency"]["seq"]).compile(built.model)
    report = estimate(program, load_profile(ctx.protocol["npu_sim"]["profile"]))
    out = {k: v for k, v in report.totals.items() if k not in ("clock_hz", "sram_bytes")}
    out.update({f"cycles {g['kind']}": g["cycles"] for g in report.summary_rows()})
    out["sparse_matmuls"] = sum(op.attrs.get("sparsity") == "2:4" for op in program.ops
                                if op.kind in ("matmul", "matmul_acc"))
    return out


def measure_memory(table: Table, row: Row, built: Built, ctx: Context, state: State) -> dict:
    """Peak RSS of `graphopt convert` (run by the row's convert step) against the model's bytes."""
    return {"rss_ratio": built.extra["peak_rss"] / built.extra["model_bytes"]}


MEASURES = {"lm": measure_lm, "embedding": measure_embedding, "image": measure_image, "backend": measure_backend,
            "npu-cost": measure_npu_cost, "memory": measure_memory}
