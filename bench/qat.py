"""QAT on SmolLM2: PTQ W8A8 static vs QAT (KD, reverse KL, BiLD), each folded to static QDQ, next to fp32.

    python bench/qat.py [--model sample:smollm2] [--steps 200] [--batch 1] [--train-windows 16]
                        [--rotate] [--observer minmax|mse] [--weight-rounding rtn|gptq] [--temperature T] [--fused]
                        [--validation N] [--generated N [--generated-only] [--prompt-tokens P]]
                        [--shuffle SEED] [--compile] [--feature-weight W] [--int16-inputs PATTERN ...]
                        [--int16-budget-over activations|points]
                        [--device cpu|cuda] [--json PATH]

Protocol: evaluation on `lm_windows(tok, "eval", 24, 128)` (odd pydoc topics), overlap@k
against fp32's logits in onnxruntime; calibration on `lm_windows(tok, "calib", 16, 128)`, training
on the first `--train-windows` calibration windows (even topics, disjoint from evaluation).
PTQ is the quantize pass at W8A8 (per-channel uint8 weights, per-tensor uint8 min-max activations,
the `--int16-budget` most sensitive points of the `--sensitivity` ranking at 16 bits, as in QAT);
QAT inserts the same points with the fake_quantize pass (asymmetric per-channel weights like the
PTQ row; `--weight-symmetric` for int8), trains weights and scales against the float model's
logits (AdamW, cosine schedule, clipping), exports the learned scales as encodings and folds them
with fold_encodings: the rows compare deployable static QDQ models. `--generated N` adds N windows the
float model writes itself (`distillation.generate_windows`: the first `--prompt-tokens` of a training window,
then sampled), interleaved with the real ones. Each QAT row also reports `torch_overlap@1`, the
trained fake-quant student itself evaluated in torch, and `int16`, its 16-bit points counted two ways:
"18/122 act, 19/334 pts" (of the activation points; of every quantized point, weights included).
`--rotate` runs the rotate
pass on the FX model first (both rows start from it; its final-norm gain is 16-bit in both). SmolLM2 trains in minutes on a
GPU (`--device cuda`); on two CPU cores a step takes ~15 s.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

import graphopt
from graphopt.errors import GraphoptError
from graphopt.evaluation.lm import evaluate_causal_lm
from graphopt.evaluation.tables import environment, markdown_table
from graphopt.files.writing import atomic_write_bytes, atomic_write_text
from graphopt.frontends.corpora import lm_windows
from graphopt.passes.rotate import gain_matrices
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext
from graphopt.training import distillation, fake_quant

COLUMNS = ["ppl", "ppl_ratio", "overlap@1", "overlap@8", "torch_overlap@1", "int16", "train_steps", "train_s", "s_per_step",
           "pipeline_s"]


def _calib_windows(model, count: int, length: int):
    return lm_windows(model.tokenizer, "calib", count, length)


def _evaluate(model, name: str, eval_windows, reference, fp32_ppl: float | None, log,
              threads: int = 0) -> tuple[dict, list]:
    log(f"qat bench: evaluating {name} on {len(eval_windows)} windows...")
    # a thread count of its own: runs that share a machine otherwise each spin up a thread per core
    row, tops = evaluate_causal_lm(model, eval_windows, reference, threads=threads)
    row["name"] = name
    row["ppl_ratio"] = row["ppl"] / fp32_ppl if fp32_ppl else 1.0
    return row, tops


def _ptq(fp32_onnx, calib, args, log) -> tuple[object, float, dict]:
    start = time.perf_counter()
    result = get_pass("quantize")(weight_bits=8, weight_symmetric=args.weight_symmetric, activation_bits=8,
                                  int16_budget=args.int16_budget, int16_budget_over=args.int16_budget_over,
                                  sensitivity=args.sensitivity, int16_weights=gain_matrices(fp32_onnx),
                                  observer=args.observer, weight_rounding=args.weight_rounding).run(
        fp32_onnx.copy(), PassContext(calib=calib, progress=False))
    seconds = time.perf_counter() - start
    log(f"qat bench: PTQ W8A8 in {seconds:.1f} s")
    return result.model, seconds, result.stats["int16_share"]


LOSS_LABELS = {"kd": "KD", "rkl": "reverse KL", "bild": "BiLD"}


def _qat(fx, calib, windows, validation, *, loss: str, steps: int, batch: int, lr: float, scale_lr: float,
         weight_scale_lr: float | None,
         temperature: float | None, symmetric: bool, int16_budget: float, sensitivity: str, observer: str,
         rounding: str, device: str, fused: bool, compile: bool, shuffle: int | None, cache_teacher: bool,
         feature_weight: float, int16_inputs: tuple[str, ...], int16_budget_over: str, log):
    start = time.perf_counter()
    student = fx.copy()
    share = get_pass("fake_quantize")(
        weight_bits=8, weight_symmetric=symmetric, activation_bits=8, int16_budget=int16_budget,
        int16_budget_over=int16_budget_over, sensitivity=sensitivity, int16_weights=gain_matrices(fx),
        observer=observer, weight_rounding=rounding, int16_inputs=int16_inputs).run(
        student, PassContext(calib=calib, progress=False)).stats["int16_share"]
    report = distillation.train(student, fx, windows, steps=steps, lr=lr, scale_lr=scale_lr, weight_scale_lr=weight_scale_lr,
                       loss=loss, batch_size=batch,
                       temperature=temperature, warmup=max(1, steps // 20), device=device, fused=fused,
                       compile=compile, shuffle=shuffle, cache_teacher=cache_teacher,
                       validation=validation, feature_weight=feature_weight, progress=False, log=log)
    lowered = graphopt.lower(fake_quant.strip_fake_quant(student), log=log)
    encodings = fake_quant.export_encodings(student, lowered)
    lowered.meta.encodings = encodings.to_meta()
    result = get_pass("fold_encodings")().run(lowered, PassContext(progress=False))
    seconds = time.perf_counter() - start
    log(f"qat bench: QAT ({loss}) {steps} steps in {report.seconds:.1f} s, pipeline {seconds:.1f} s; "
        f"fold: {json.dumps({k: v for k, v in result.stats.items() if not isinstance(v, list)})}")
    return result.model, report, seconds, encodings, student, share


def _share_label(share: dict) -> str:
    (act, of_act), (pts, of_pts) = share["activations"], share["points"]
    return f"{act}/{of_act} act, {pts}/{of_pts} pts"


def _interleave(a: list, b: list) -> list:
    """a and b merged evenly, each keeping its order."""
    keyed = [(i / len(a), 0, x) for i, x in enumerate(a)] + [(i / len(b), 1, x) for i, x in enumerate(b)]
    return [x for *_, x in sorted(keyed, key=lambda t: t[:2])]


def _generated(fx, prompts, args, log) -> list:
    """`--generated` windows written by the float model, or read from `--generated-file` when it
    holds them (parallel runs share one generation)."""
    path = args.generated_file
    if path and path.is_file():
        stored = np.load(path)
        if stored.shape != (args.generated, args.length):
            raise GraphoptError(f"--generated-file {path}: holds {stored.shape[0]} x {stored.shape[1]} tokens, "
                                f"not --generated {args.generated} x --length {args.length}")
        log(f"qat bench: {len(stored)} generated windows read from {path}")
        return [row[None, :] for row in stored]
    start = time.perf_counter()
    generated = distillation.generate_windows(fx, prompts, args.generated, length=args.length, prompt_tokens=args.prompt_tokens,
                                     temperature=args.sample_temperature, seed=args.seed,
                                     batch_size=args.generate_batch, device=args.device, progress=False)
    log(f"qat bench: {args.generated} windows generated from {args.prompt_tokens}-token prompts "
        f"in {time.perf_counter() - start:.1f} s")
    if path:
        atomic_write_bytes(path, _npy_bytes(np.concatenate(generated)))
    return generated


def _npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def run(args, log) -> dict | None:
    fx = graphopt.load(args.model, log=log)
    train_windows = _calib_windows(fx, max(args.calib, args.train_windows), args.length)
    calib = [{fx.inputs[0].name: w} for w in train_windows[:args.calib]]
    # validation windows are the last --validation of the training windows, held out from training
    validation = train_windows[args.train_windows - args.validation:args.train_windows] if args.validation else None
    train_windows = train_windows[:args.train_windows - args.validation]
    if args.generated:
        # before the rotation: the same function, and a --generate-only run needs no export
        generated = _generated(fx, train_windows, args, log)
        if args.generate_only:
            return None
        # interleaved, so every batch mixes real and generated text
        train_windows = generated if args.generated_only else _interleave(train_windows, generated)
    fp32 = graphopt.lower(fx, log=log)
    if args.rotate:
        # the FX form finds the stream on this (cached) export; the ONNX form rotates it the same
        # way, which spares a second export of the rotated model (a minute of GPU-host time)
        rotate = get_pass("rotate")()
        results = [rotate.run(m, PassContext(progress=False)) for m in (fx, fp32)]
        fx, fp32 = (r.model for r in results)
        log(f"qat bench: rotate: {json.dumps(results[0].stats)}")
    eval_windows = lm_windows(fp32.tokenizer, "eval", args.windows, args.length)
    row, reference = _evaluate(fp32, "fp32", eval_windows, None, None, log, args.threads)
    fp32_ppl = row["ppl"]
    row.update({"overlap@1": 1.0, "overlap@8": 1.0})
    rows = [row]
    if "ptq" in args.rows:
        model, seconds, share = _ptq(fp32, calib, args, log)
        label = "PTQ W8A8 static (quantize" + (", GPTQ)" if args.weight_rounding == "gptq" else ")")
        row, _ = _evaluate(model, label, eval_windows, reference, fp32_ppl, log, args.threads)
        rows.append({**row, "int16": _share_label(share), "int16_share": share, "pipeline_s": seconds})
        del model
        gc.collect()
    for loss in LOSS_LABELS:
        if f"qat-{loss}" not in args.rows:
            continue
        model, report, seconds, encodings, student, share = _qat(
            fx, calib, train_windows, validation, loss=loss, steps=args.steps, batch=args.batch, lr=args.lr,
            scale_lr=args.scale_lr, weight_scale_lr=args.weight_scale_lr, temperature=args.temperature,
            symmetric=args.weight_symmetric, int16_budget=args.int16_budget, sensitivity=args.sensitivity,
            observer=args.observer, rounding=args.weight_rounding, device=args.device, fused=args.fused,
            compile=args.compile, shuffle=args.shuffle, cache_teacher=not args.no_teacher_cache,
            feature_weight=args.feature_weight, int16_inputs=tuple(args.int16_inputs),
            int16_budget_over=args.int16_budget_over, log=log)
        # the trained fake-quant model itself, in torch: what the encodings mean, before any runtime's kernels
        torch_row, _ = _evaluate(student, "QAT student (torch fake quant)", eval_windows, reference, fp32_ppl, log)
        del student
        if args.encodings_dir:
            encodings.write(Path(args.encodings_dir) / f"qat-{loss}.encodings")
        label = (f"{LOSS_LABELS[loss]}{f', T={args.temperature:g}' if args.temperature else ''}"
                 f"{', fused' if args.fused else ''}{', GPTQ start' if args.weight_rounding == 'gptq' else ''}"
                 f"{', weight grids fixed' if args.weight_scale_lr == 0 else ''}"
                 f"{f', features x{args.feature_weight:g}' if args.feature_weight else ''}"
                 f"{f', shuffled ({args.shuffle})' if args.shuffle is not None else ''}{', compiled' if args.compile else ''}"
                 f"{f', +{args.generated} generated' if args.generated and not args.generated_only else ''}"
                 f"{f', {args.generated} generated only' if args.generated_only else ''}")
        row, _ = _evaluate(model, f"QAT ({label}, {args.steps} steps, lr {args.lr:g}) + fold_encodings",
                           eval_windows, reference, fp32_ppl, log, args.threads)
        rows.append({**row, "int16": _share_label(share), "int16_share": share, "train_steps": report.steps, "train_s": report.seconds,
                     "s_per_step": report.seconds_per_step, "pipeline_s": seconds,
                     "loss_first": report.losses[0], "loss_last10": sum(report.losses[-10:]) / min(10, len(report.losses)),
                     "best_step": report.best_step, "validation": report.validation,
                     "torch_overlap@1": torch_row["overlap@1"], "torch_ppl": torch_row["ppl"]})
        del model
        gc.collect()
    return {
        "model": args.model,
        "protocol": {"eval": {"split": "eval", "windows": args.windows, "length": args.length},
                     "calibration": {"split": "calib", "windows": args.calib, "length": args.length},
                     "train": {"split": "calib", "windows": args.train_windows, "length": args.length,
                               "steps": args.steps, "batch": args.batch, "lr": args.lr, "scale_lr": args.scale_lr,
                               "weight_scale_lr": args.weight_scale_lr,
                               "temperature": args.temperature, "fused": args.fused, "validation": args.validation,
                               "feature_weight": args.feature_weight,
                               "generated": args.generated, "generated_only": args.generated_only,
                               "prompt_tokens": args.prompt_tokens, "sample_temperature": args.sample_temperature,
                               "seed": args.seed, "shuffle": args.shuffle, "compile": args.compile,
                               "weight_symmetric": args.weight_symmetric, "device": args.device},
                     "rotate": args.rotate, "ptq_observer": args.observer, "weight_rounding": args.weight_rounding,
                     "int16": {"budget": args.int16_budget, "over": args.int16_budget_over,
                               "sensitivity": args.sensitivity,
                               "qat_inputs": args.int16_inputs},
                     "reference": "fp32 (ONNX Runtime)"},
        "machine": environment(device=args.device),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sample:smollm2")
    parser.add_argument("--rows", nargs="*", default=["ptq", "qat-kd", "qat-bild"],
                        choices=["ptq", "qat-kd", "qat-rkl", "qat-bild"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1, help="windows per training step")
    parser.add_argument("--train-windows", type=int, default=16, help="calibration-split windows trained on")
    parser.add_argument("--validation", type=int, default=0,
                        help="hold out the last N training windows; QAT keeps its best step by top-1 agreement there")
    parser.add_argument("--weight-symmetric", action="store_true", help="int8 weights (default: uint8 asymmetric)")
    parser.add_argument("--int16-budget", type=float, default=0.0, help="fraction of points at 16 bits")
    parser.add_argument("--int16-budget-over", choices=["activations", "points"], default="activations",
                        help="QAT rows: the budget is a fraction of the activation points, or of every point")
    parser.add_argument("--int16-inputs", nargs="*", default=[], metavar="PATTERN",
                        help="QAT rows: the inputs of the weights these match (names, globs) at 16 bits, "
                             "then the ranking up to the budget")
    parser.add_argument("--sensitivity", default="", help="`graphopt sensitivity` JSON choosing those points")
    parser.add_argument("--rotate", action="store_true", help="rotate the residual stream first (rotate pass, FX form)")
    parser.add_argument("--observer", default="minmax", choices=["minmax", "percentile", "mse"],
                        help="activation ranges: the PTQ row's, and the QAT quantizers' initial ones")
    parser.add_argument("--weight-rounding", default="rtn", choices=["rtn", "gptq"],
                        help="PTQ weights, and QAT's starting weights: round to nearest or GPTQ")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--scale-lr", type=float, default=1e-3)
    parser.add_argument("--weight-scale-lr", type=float,
                        help="lr of the weight quantizers' scales (default: --scale-lr; 0 keeps a GPTQ start's grids)")
    parser.add_argument("--temperature", type=float,
                        help="distillation temperature (default: KD 2, reverse KL 1, BiLD 3)")
    parser.add_argument("--feature-weight", type=float, default=0.0,
                        help="add this many times distillation.feature_loss (every linear's input against the float model's)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: one per core)")
    parser.add_argument("--fused", action="store_true",
                        help="train with torch's fused fake-quant kernels (8-bit points; 2.3x faster on CPU, "
                             "3-5x slower on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU: fewer launches)")
    parser.add_argument("--shuffle", type=int, help="seed: each epoch visits the training windows in a random order")
    parser.add_argument("--generated", type=int, default=0,
                        help="add N windows the float model writes from prompts cut from the training windows")
    parser.add_argument("--generated-only", action="store_true", help="train on the generated windows alone")
    parser.add_argument("--generated-file", type=Path,
                        help="a .npy of generated windows: read when it exists, else written (runs in parallel share it)")
    parser.add_argument("--generate-batch", type=int, default=256, help="windows generated at once")
    parser.add_argument("--generate-only", action="store_true",
                        help="write --generated-file and stop (the first step of a sweep)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="real tokens that start a generated window")
    parser.add_argument("--sample-temperature", type=float, default=1.0, help="sampling temperature of generation")
    parser.add_argument("--seed", type=int, default=0, help="seed of generation")
    parser.add_argument("--no-teacher-cache", action="store_true",
                        help="compute the teacher's logits at every step instead of keeping them (12.6 MB a window)")
    parser.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda)")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--encodings-dir", type=Path, help="write each QAT run's AIMET 1.0.0 encodings here")
    args = parser.parse_args(argv)
    if not 0 <= args.validation < args.train_windows:
        parser.error(f"--validation {args.validation} must hold out fewer than --train-windows {args.train_windows}")
    log = lambda message: print(message, file=sys.stderr, flush=True)
    if args.generate_only and not (args.generated and args.generated_file):
        parser.error("--generate-only needs --generated N and --generated-file PATH")
    try:
        data = run(args, log)
    except GraphoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if data is None:
        return 0
    data["command"] = "python bench/qat.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(markdown_table(data["rows"], COLUMNS), end="")
    if args.json:
        atomic_write_text(args.json, json.dumps(data, indent=2, default=str))
        log(f"qat bench: rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
