"""npu-sim on real models: agreement with onnxruntime on the QDQ model, simulation time, cost reports.

    python bench/npu_sim.py [--windows 8] [--seq 128] [--minilm-batches 4] [--json PATH]

SmolLM2: the ONNX sample quantized W8A8 (per-channel int8 weights, int8 activations) by
onnxruntime's quantize_static on 16 calibration windows x 128 tokens (`npu_sim.ort_qdq`), compiled
for [1, seq]; on `--windows` evaluation windows it reports perplexity and overlap@1/@8 of the ORT
QDQ model against fp32 and of the simulator against the ORT QDQ model (top-1 agreement), the
simulator's seconds per window, and the cost of one prefill on the default profile, dense and
with 2:4 weights (`nm_sparsity` by magnitude before quantization), side by side.
MiniLM: mean cosine of the simulator's sentence embeddings against the ORT QDQ model.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time

import numpy as np

import graphopt
from graphopt import evaluation, samples
from graphopt.backends.npu_sim import NpuSim, compare_outputs
from graphopt.backends.npu_sim.compiler import compile_model
from graphopt.backends.npu_sim.cost import estimate, load_profile
from graphopt.backends.npu_sim.ort_qdq import ort_qdq
from graphopt.backends.npu_sim.simulator import Simulator
from graphopt.onnx_io import atomic_write_text
from graphopt.pass_infra import PassContext


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def two_four(model):
    """SmolLM2 with every prunable linear weight at 2:4 by magnitude (the nm_sparsity pass)."""
    from graphopt.pipeline import get_pass

    pruner = get_pass("nm_sparsity")(pattern="2:4", method="magnitude", sequential=False)
    return pruner.run(model.copy(), PassContext(calib=None, progress=False)).model


def smollm2_rows(args, profile):
    fp32 = graphopt.load("sample:smollm2", form="onnx", log=log)
    tok = fp32.tokenizer
    calib = [{"input_ids": w} for w in samples.lm_windows(tok, "calib", 16, args.seq)]
    windows = samples.lm_windows(tok, "eval", args.windows, args.seq)
    log("bench: fp32 and ORT QDQ references ...")
    fp32_row, fp32_top = evaluation.evaluate_causal_lm(fp32, windows)
    start = time.perf_counter()
    qdq = ort_qdq(fp32, calib)
    quantize_s = time.perf_counter() - start
    qdq_row, qdq_top = evaluation.evaluate_causal_lm(qdq, windows, fp32_top)
    start = time.perf_counter()
    program = NpuSim(seq_len=args.seq).compile(qdq)
    compile_s = time.perf_counter() - start
    log(f"bench: compiled in {compile_s:.1f} s: {program.count('npu')} NPU ops, {program.count('host')} host ops")
    simulator = Simulator(program)
    seconds = []

    def simulate(ids):
        begin = time.perf_counter()
        out = simulator.run({"input_ids": ids})[0]
        seconds.append(time.perf_counter() - begin)
        log(f"bench: window {len(seconds)}/{len(windows)} simulated in {seconds[-1]:.1f} s")
        return out

    sim_row, _ = evaluation.evaluate_causal_lm(simulate, windows, qdq_top)
    rows = [
        {"name": "fp32 (ORT)", **fp32_row},
        {"name": "W8A8 QDQ (ORT) vs fp32", **qdq_row},
        {"name": "npu-sim vs ORT QDQ", **sim_row, "sim_s_per_window": float(np.median(seconds)),
         "sim_min_s": float(np.min(seconds))},
    ]
    dense = estimate(program, profile)
    log("bench: 2:4 weights (nm_sparsity magnitude) ...")
    sparse_qdq = ort_qdq(two_four(fp32), calib)
    sparse_program = NpuSim(seq_len=args.seq).compile(sparse_qdq)
    sparse = estimate(sparse_program, profile)
    sparse_row, _ = evaluation.evaluate_causal_lm(sparse_qdq, windows[:2], fp32_top[:2])
    extra = {"quantize_s": quantize_s, "compile_s": compile_s, "npu_ops": program.count("npu"),
             "host_ops": program.count("host"), "host_partition": program.host_partition,
             "sparse_matmuls": sum(op.attrs.get("sparsity") == "2:4" for op in sparse_program.ops if op.kind == "matmul"),
             "sparse_qdq_vs_fp32_2win": sparse_row}
    return rows, dense, sparse, extra


def minilm_row(args):
    model = graphopt.load("sample:minilm", form="onnx", log=log)
    qdq = ort_qdq(model, samples.minilm_batches(model.tokenizer, "calib", 8))
    session = qdq.session()
    cosines, seconds, programs = [], [], {}
    for feeds in samples.minilm_batches(model.tokenizer, "eval", args.minilm_batches):
        key = tuple(feeds["input_ids"].shape)
        if key not in programs:
            programs[key] = Simulator(compile_model(qdq, feeds))
        start = time.perf_counter()
        sim = programs[key].run(feeds)[0]
        seconds.append(time.perf_counter() - start)
        cosines.append(compare_outputs(sim, session.run(None, feeds)[0])["cosine"])
    return {"name": "MiniLM npu-sim vs ORT QDQ", "batches": len(cosines), "mean_cosine": float(np.mean(cosines)),
            "min_cosine": float(np.min(cosines)), "sim_s_per_batch": float(np.median(seconds))}


def cost_table(dense, sparse) -> str:
    keys = [("cycles", "{:,}"), ("time_ms", "{:.3f}"), ("macs", "{:,}"), ("weight_bytes", "{:,}"),
            ("dram_read", "{:,}"), ("sram_peak", "{:,}"), ("utilisation", "{:.3f}"), ("compute_bound", "{}"),
            ("memory_bound", "{}"), ("npu_ops", "{}"), ("host_ops", "{}")]
    lines = ["| total | W8A8 dense | W8A8 2:4 | ratio |", "|---|---|---|---|"]
    for key, fmt in keys:
        a, b = dense.totals[key], sparse.totals[key]
        ratio = f"{b / a:.3f}" if a else ""
        lines.append(f"| {key} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    by_kernel = ["", "| kernel | dense cycles | 2:4 cycles |", "|---|---|---|"]
    sparse_groups = {g["kind"]: g for g in sparse.summary_rows()}
    for g in dense.summary_rows()[:8]:
        by_kernel.append(f"| {g['kind']} | {g['cycles']:,} | {sparse_groups.get(g['kind'], {}).get('cycles', 0):,} |")
    return "\n".join(lines + by_kernel) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8, help="SmolLM2 evaluation windows (issue protocol: 24)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--minilm-batches", type=int, default=4)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    minilm = minilm_row(args)
    rows, dense, sparse, extra = smollm2_rows(args, profile)
    print(f"## SmolLM2-135M, {args.windows} eval windows x {args.seq} tokens\n")
    print(evaluation.markdown_table(rows, ["ppl", "overlap@1", "overlap@8", "sim_s_per_window", "sim_min_s"]))
    print(f"compile {extra['compile_s']:.1f} s; {extra['npu_ops']} NPU ops, {extra['host_ops']} host ops "
          f"({', '.join(sorted({h['op'] for h in extra['host_partition']}))})\n")
    print(f"## Cost of one {args.seq}-token prefill on '{profile.name}'\n")
    print(cost_table(dense, sparse))
    print("## MiniLM\n")
    print(evaluation.markdown_table([minilm], ["batches", "mean_cosine", "min_cosine", "sim_s_per_batch"]))
    if args.json:
        payload = {"command": "python " + " ".join(shlex.quote(a) for a in ["bench/npu_sim.py"] + (argv or sys.argv[1:])),
                   "machine": platform.platform(), "smollm2": rows, "cost_dense": dense.totals,
                   "cost_2_4": sparse.totals, "minilm": minilm, "extra": extra}
        atomic_write_text(args.json, json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
