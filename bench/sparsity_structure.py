"""Structural pruning on SmolLM2 (one KV group per layer + 25 % FFN channels) by importance measure, and MiniLM 4/12 heads.

    python bench/sparsity_structure.py [--json PATH] [--measures l1,l2,activation,fluctuation+bias]

Protocol (issue 5): 24 evaluation windows × 128 tokens (odd pydoc topics), 16 calibration
windows × 128 tokens (even topics), overlap@k against fp32's logits, ORT CPU latency of one
batch-1 run at sequence length 128. MiniLM: heads=4 of 12 per layer, mean cosine of the sentence
embeddings against fp32 on 8 evaluation batches. `structure_rows` is what bench/sparsity.py calls.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import graphopt
from graphopt.errors import GraphoptError
from graphopt.evaluation import metrics
from graphopt.evaluation.latency import ort_latency
from graphopt.evaluation.lm import benchmark_causal_lm
from graphopt.evaluation.sizes import disk_bytes
from graphopt.evaluation.tables import markdown_table
from graphopt.files.writing import atomic_write_text
from graphopt.frontends.corpora import lm_windows, minilm_batches
from graphopt.ir.runtime import ort_session
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext

COLUMNS = ["ppl", "ppl_x", "overlap@1", "overlap@8", "cosine", "params", "params_x", "bytes", "bytes_x",
           "latency_ms", "latency_min_ms", "latency_x", "paired_latency_x", "pass_s"]
MEASURES = ["l1", "l2", "activation", "activation+bias", "fluctuation+bias"]


def _pass_for(measure: str, **ratios):
    importance, _, bias = measure.partition("+")
    return get_pass("prune_structure")(importance=importance, bias_compensation=bias == "bias", **ratios)


def structure_rows(fp32_onnx_model, calib_feeds, eval_windows, reference_logits, *, measures=None,
                   latency_repeats: int = 10, threads: int = 0, minilm: bool = True, log=print) -> list[dict]:
    """Bench rows: SmolLM2 with one of three KV groups per layer and 25 % of FFN channels removed by
    each importance measure (ppl, overlap@1/@8, params, bytes, ORT latency at seq 128, pass time),
    then MiniLM with 4 of 12 heads per layer removed (embedding cosine, params, bytes, latency)."""
    rows, pruned = [], None
    length = int(np.atleast_2d(eval_windows[0]).shape[-1])
    for measure in measures or MEASURES:
        prune = _pass_for(measure, heads=1, ffn_ratio=0.25)
        start = time.perf_counter()
        result = prune.run(fp32_onnx_model.copy(), PassContext(calib=calib_feeds))
        seconds = time.perf_counter() - start
        log(f"structure: {measure}: {result.stats.get('heads_removed', 0)} heads, "
            f"{result.stats.get('ffn_channels_removed', 0)} FFN channels removed in {seconds:.1f} s; evaluating...")
        row, _ = benchmark_causal_lm(result.model, eval_windows, reference_logits, latency_seq=length,
                                                latency_repeats=latency_repeats, threads=threads)
        rows.append({"name": f"smollm2 kv 2/3 + ffn 75% ({measure})", **row, "pass_s": seconds})
        pruned = result.model
        del result
        gc.collect()
    if pruned is not None:
        # every measure removes the same amount, so one interleaved timing serves all rows
        ids = np.atleast_2d(eval_windows[0])[:1, :length].astype(np.int64)
        paired = paired_latency(fp32_onnx_model, pruned, {fp32_onnx_model.inputs[0].name: ids},
                                rounds=2 * latency_repeats, threads=threads)
        log(f"structure: interleaved latency {paired}")
        for row in rows:
            row["paired_latency_x"] = paired["ratio_median"]
            row["paired"] = paired
    if minilm:
        rows += minilm_rows(latency_repeats=latency_repeats, threads=threads, log=log)
    return rows


def paired_latency(dense, pruned, feeds, *, rounds: int = 20, threads: int = 0) -> dict:
    """ORT latency of two models run alternately, so that load from other processes hits both alike.

    Returns each model's minimum and median in ms, and the median over rounds of pruned/dense.
    """
    sessions = [ort_session(m.to_onnx(), threads=threads, consume=True) for m in (dense, pruned)]
    models, times = (dense, pruned), ([], [])
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            timing = ort_latency(models[i], feeds, 1, warmup=2 if r < 2 else 0, session=sessions[i])
            times[i].append(timing["min_ms"])
    return {"dense_min_ms": min(times[0]), "pruned_min_ms": min(times[1]),
            "dense_median_ms": statistics.median(times[0]), "pruned_median_ms": statistics.median(times[1]),
            "ratio_min": min(times[1]) / min(times[0]),
            "ratio_median": statistics.median(p / d for d, p in zip(*times)), "rounds": rounds}


def minilm_rows(*, latency_repeats: int = 10, threads: int = 0, log=print) -> list[dict]:
    """MiniLM (12 heads × 32 per layer): fp32 and 4 heads per layer removed, embedding cosine vs fp32."""
    model = graphopt.load("sample:minilm", form="onnx", log=log)
    calib = minilm_batches(model.tokenizer, "calib", 8)
    batches = minilm_batches(model.tokenizer, "eval", 8)
    run = model.runner()
    reference = [run(b)[0] for b in batches]
    latency_feed = batches[0]
    rows = [_minilm_row("minilm fp32", model, batches, reference, latency_feed, latency_repeats, threads, 0.0)]
    for measure in ("l2", "activation", "fluctuation+bias"):
        start = time.perf_counter()
        result = _pass_for(measure, heads=4).run(model.copy(), PassContext(calib=calib, progress=False))
        seconds = time.perf_counter() - start
        rows.append(_minilm_row(f"minilm heads 8/12 ({measure})", result.model, batches, reference, latency_feed,
                                latency_repeats, threads, seconds))
    paired = paired_latency(model, result.model, latency_feed, rounds=2 * latency_repeats, threads=threads)
    for row in rows[1:]:
        row["paired_latency_x"], row["paired"] = paired["ratio_median"], paired
    return rows


def _minilm_row(name, model, batches, reference, latency_feed, repeats, threads, seconds) -> dict:
    run = model.runner()
    cos = float(np.mean([metrics.cosine(ref, run(b)[0], axis=-1) for ref, b in zip(reference, batches)]))
    latency = ort_latency(model, latency_feed, repeats, threads=threads)
    return {"name": name, "cosine": cos, "params": model.num_params(), "bytes": disk_bytes(model),
            "latency_ms": latency["median_ms"], "latency_min_ms": latency["min_ms"], "pass_s": seconds}


def add_ratios(rows: list[dict], dense: dict) -> None:
    """ppl, params, bytes and latency of each SmolLM2 row as a multiple of the dense row's."""
    for row in rows:
        if not row["name"].startswith("smollm2"):
            continue
        for key, column in (("ppl", "ppl_x"), ("params", "params_x"), ("bytes", "bytes_x"), ("latency_ms", "latency_x")):
            row[column] = row[key] / dense[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--measures", default=",".join(MEASURES), help="importance[+bias], comma-joined")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="ORT intra-op threads (0: ORT decides; 1 is steadiest on a shared machine)")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    try:
        fp32 = graphopt.load("sample:smollm2", form="onnx", log=log)
        eval_windows = lm_windows(fp32.tokenizer, "eval", args.windows, args.length)
        calib = [{"input_ids": w} for w in lm_windows(fp32.tokenizer, "calib", args.calib_windows, args.length)]
        log(f"structure: fp32 on {args.windows} x {args.length} eval tokens...")
        dense, reference = benchmark_causal_lm(fp32, eval_windows, latency_seq=args.length,
                                                          latency_repeats=args.latency_repeats, threads=args.threads)
        dense = {"name": "smollm2 fp32", **dense, "pass_s": 0.0}
        rows = structure_rows(fp32, calib, eval_windows, reference, measures=args.measures.split(","),
                              latency_repeats=args.latency_repeats, threads=args.threads, log=log)
    except GraphoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [dense] + rows
    add_ratios(rows, dense)
    command = "python bench/sparsity_structure.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(markdown_table(rows, COLUMNS), end="")
    if args.json:
        data = {"model": "smollm2 + minilm", "command": command,
                "protocol": {"eval_windows": args.windows, "calib_windows": args.calib_windows, "length": args.length,
                             "latency": {"seq": args.length, "batch": 1, "repeats": args.latency_repeats,
                                         "threads": args.threads or "ort default"}},
                "rows": rows}
        atomic_write_text(args.json, json.dumps(data, indent=2, default=float))
        log(f"structure: rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
