"""npu-sim on real models: agreement with onnxruntime on the QDQ model, simulation time, cost reports.

    python bench/npu_sim.py [--windows 24] [--seq 128] [--minilm-batches 8] [--recipes R.yaml ...] [--json PATH]

SmolLM2: the ONNX sample quantized by graphopt's recipes (samples/recipes/smollm2-w8a8.yaml and
smollm2-w8a16.yaml: the `quantize` pass, 16 calibration windows x 128 tokens), compiled for
[1, seq]. On `--windows` evaluation windows, per recipe: the QDQ model in onnxruntime with QDQ
semantics (optimization "basic": DequantizeLinear -> float op -> QuantizeLinear) against fp32;
onnxruntime's default session (fused integer kernels) against that; and the simulator against
both (top-1 agreement), with its seconds per window. A quantized model is chaotic at its
rounding boundaries: two exact-in-float implementations of one QDQ graph disagree wherever a
last-bit difference moves a value across a grid point, so the fused-vs-basic row is the floor
any other implementation is measured against. Then the cost of one prefill on the default
profile for the first recipe, dense and with 2:4 weights (the rotate pass, then `nm_sparsity` by
magnitude, then the same recipe), side by side. MiniLM: samples/recipes/minilm-w8a8.yaml; mean cosine of the
simulator's sentence embeddings against onnxruntime on the same QDQ model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

import graphopt
from graphopt.backends.npu_sim import NpuSim, compare_outputs
from graphopt.backends.npu_sim.compiler import compile_model
from graphopt.backends.npu_sim.cost import estimate, load_profile
from graphopt.backends.npu_sim.simulator import Simulator
from graphopt.evaluation.lm import evaluate_causal_lm
from graphopt.evaluation.tables import environment, markdown_table
from graphopt.files.writing import atomic_write_text
from graphopt.frontends.corpora import lm_windows, minilm_batches
from graphopt.ir.runtime import ort_session
from graphopt.pipeline.passes import PassContext
from graphopt.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "samples" / "recipes"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def two_four(model):
    """SmolLM2 with every prunable linear weight at 2:4 by magnitude (the nm_sparsity pass)."""
    from graphopt.pipeline import get_pass

    pruner = get_pass("nm_sparsity")(pattern="2:4", method="magnitude", sequential=False)
    return pruner.run(model.copy(), PassContext(calib=None, progress=False)).model


def rotated(model):
    """The rotate pass first: 2:4 masks are then chosen on the weights the W8A8 recipe quantizes
    (its own rotate step leaves masked weights alone)."""
    from graphopt.pipeline import get_pass

    return get_pass("rotate")().run(model.copy(), PassContext(progress=False)).model


def recipe_qdq(model, recipe_name: str):
    """`model` through a sample recipe's passes, calibrated as the recipe says."""
    recipe = load_recipe(RECIPES / recipe_name)
    pipeline = graphopt.Pipeline(recipe.passes, verify=False, progress=False, log=lambda *_: None)
    return pipeline.run(model, calib=recipe.calibration_feeds(model)).model


def _ort_logits(model, optimization: str):
    session = ort_session(model.to_onnx(), optimization=optimization, consume=True)
    return lambda ids: session.run(None, {"input_ids": ids})[0]


def smollm2_rows(args, profile):
    """Per recipe: the QDQ model in onnxruntime with QDQ semantics ("basic": DequantizeLinear ->
    float op -> QuantizeLinear) and with its fused integer kernels ("all", the default), and the
    simulator against both."""
    fp32 = graphopt.load("sample:smollm2", form="onnx", log=log)
    tok = fp32.tokenizer
    windows = lm_windows(tok, "eval", args.windows, args.seq)
    log("bench: fp32 reference ...")
    fp32_row, fp32_top = evaluate_causal_lm(fp32, windows)
    rows = [{"name": "fp32 (ORT)", **fp32_row}]
    extra = {}
    for recipe in args.recipes:
        label = recipe.removeprefix("smollm2-").removesuffix(".yaml").upper()
        start = time.perf_counter()
        qdq = recipe_qdq(fp32, recipe)
        extra[f"{label}_quantize_s"] = time.perf_counter() - start
        basic_row, basic_top = evaluate_causal_lm(_ort_logits(qdq, "basic"), windows, fp32_top)
        fused_row, fused_top = evaluate_causal_lm(_ort_logits(qdq, "all"), windows, basic_top)
        start = time.perf_counter()
        program = NpuSim(seq_len=args.seq).compile(qdq)
        extra[f"{label}_compile_s"] = time.perf_counter() - start
        log(f"bench: {label} compiled: {program.count('npu')} NPU ops, {program.count('host')} host ops")
        simulator = Simulator(program)
        seconds = []

        def simulate(ids):
            begin = time.perf_counter()
            out = simulator.run({"input_ids": ids})[0]
            seconds.append(time.perf_counter() - begin)
            log(f"bench: {label} window {len(seconds)}/{len(windows)} simulated in {seconds[-1]:.1f} s")
            return out

        sim_row, sim_top = evaluate_causal_lm(simulate, windows, basic_top)
        sim_vs_fused = float(np.mean([np.mean(a[..., 0] == b[..., 0]) for a, b in zip(sim_top, fused_top)]))
        rows += [
            {"name": f"{label} QDQ, ORT basic (QDQ semantics) vs fp32", **basic_row},
            {"name": f"{label} QDQ, ORT all (fused kernels) vs ORT basic", **fused_row},
            {"name": f"{label} npu-sim vs ORT basic", **sim_row, "top1_vs_ort_all": sim_vs_fused,
             "sim_s_per_window": float(np.median(seconds)), "sim_min_s": float(np.min(seconds))},
        ]
        if recipe == args.recipes[0]:
            program_for_cost = program
            extra.update(npu_ops=program.count("npu"), host_ops=program.count("host"),
                         host_partition=program.host_partition)
    program = program_for_cost
    dense = estimate(program, profile)
    log("bench: 2:4 weights (nm_sparsity magnitude) ...")
    sparse_qdq = recipe_qdq(two_four(rotated(fp32)), args.recipes[0])
    sparse_program = NpuSim(seq_len=args.seq).compile(sparse_qdq)
    sparse = estimate(sparse_program, profile)
    sparse_row, _ = evaluate_causal_lm(sparse_qdq, windows[:2], fp32_top[:2])
    extra.update({"sparse_matmuls": sum(op.attrs.get("sparsity") == "2:4" for op in sparse_program.ops
                                  if op.kind in ("matmul", "matmul_acc")),
             "sparse_qdq_vs_fp32_2win": sparse_row})
    return rows, dense, sparse, extra


def minilm_row(args):
    model = graphopt.load("sample:minilm", form="onnx", log=log)
    qdq = recipe_qdq(model, "minilm-w8a8.yaml")
    session = qdq.session()
    cosines, seconds, programs = [], [], {}
    for feeds in minilm_batches(model.tokenizer, "eval", args.minilm_batches):
        key = tuple(feeds["input_ids"].shape)
        if key not in programs:
            programs[key] = Simulator(compile_model(qdq, feeds))
        start = time.perf_counter()
        sim = programs[key].run(feeds)[0]
        seconds.append(time.perf_counter() - start)
        cosines.append(compare_outputs(sim, session.run(None, feeds)[0])["cosine"])
    return {"name": "MiniLM npu-sim vs ORT QDQ", "batches": len(cosines), "mean_cosine": float(np.mean(cosines)),
            "min_cosine": float(np.min(cosines)), "sim_s_per_batch": float(np.median(seconds))}


def cost_table(dense, sparse, label: str) -> str:
    keys = [("cycles", "{:,}"), ("time_ms", "{:.3f}"), ("macs", "{:,}"), ("weight_bytes", "{:,}"),
            ("dram_read", "{:,}"), ("sram_peak", "{:,}"), ("utilisation", "{:.3f}"), ("compute_bound", "{}"),
            ("memory_bound", "{}"), ("npu_ops", "{}"), ("host_ops", "{}")]
    lines = [f"| total | {label} dense | {label} 2:4 | ratio |", "|---|---|---|---|"]
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
    parser.add_argument("--windows", type=int, default=24, help="SmolLM2 evaluation windows (the issues' protocol)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--minilm-batches", type=int, default=8)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--recipes", nargs="+", default=["smollm2-w8a8.yaml", "smollm2-w8a16.yaml"],
                        help="samples/recipes files; the first one also gets the cost report")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"],
                        help="MiniLM always runs (it is fast); leave out smollm2 to skip its rows")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    minilm = minilm_row(args)
    if "smollm2" not in args.models:
        print("## MiniLM\n")
        print(markdown_table([minilm], ["batches", "mean_cosine", "min_cosine", "sim_s_per_batch"]))
        return 0
    rows, dense, sparse, extra = smollm2_rows(args, profile)
    print(f"## SmolLM2-135M, {args.windows} eval windows x {args.seq} tokens\n")
    print(markdown_table(rows, ["ppl", "overlap@1", "overlap@8", "top1_vs_ort_all", "sim_s_per_window",
                                           "sim_min_s"]))
    print(f"{extra['npu_ops']} NPU ops, {extra['host_ops']} host ops "
          f"({', '.join(sorted({h['op'] for h in extra['host_partition']}))})\n")
    print(f"## Cost of one {args.seq}-token prefill on '{profile.name}'\n")
    print(cost_table(dense, sparse, args.recipes[0].removeprefix("smollm2-").removesuffix(".yaml").upper()))
    print("## MiniLM\n")
    print(markdown_table([minilm], ["batches", "mean_cosine", "min_cosine", "sim_s_per_batch"]))
    if args.json:
        payload = {"command": "python " + " ".join(shlex.quote(a) for a in ["bench/npu_sim.py"] + (argv or sys.argv[1:])),
                   "machine": environment(), "smollm2": rows, "cost_dense": dense.totals,
                   "cost_2_4": sparse.totals, "minilm": minilm, "extra": extra}
        atomic_write_text(args.json, json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
