"""QAT end to end: fake-quantize SmolLM2, distil it from the float model, fold the learned scales.

    python samples/qat.py [--steps 40] [--batch 2] [--device cpu|cuda] [--int16-inputs PATTERN ...] [-o out/qat]

The steps an engineer runs to get a static W8A8 model whose scales came from training instead of
calibration alone:
1. load the FX form and rotate its residual stream (the `rotate` pass, as the W8A8 recipe does);
2. `fake_quantize`: learnable quantizers at the points the ONNX `quantize` pass would use, the
   15 % most sensitive activations at 16 bits (or the inputs of the weights `--int16-inputs`
   matches, e.g. '*.mlp.down_proj.weight', then the ranking up to that budget), ranges
   initialised by the MSE observer, weights
   rounded by GPTQ (what the smollm2-w8a8-gptq recipe computes, before any training);
3. `distillation.train`: full-vocabulary KD at T=1 against the float model (the best setting of
   bench/qat.py's GPU sweep), on the CPU with torch's fused fake-quant kernels (on CUDA they
   are slower than the reference formula);
4. lower the trained student to ONNX, export its scales as AIMET 1.0.0 encodings
   (`OUT/smollm2-w8a8.encodings`) and fold them into a static QDQ model (`fold_encodings`),
   written to `OUT/smollm2-w8a8-qat.onnx`; then compare it with the float model in onnxruntime.
The defaults are a short CPU run: 5.1 minutes on two cores with a warm export cache, overlap@1
0.9473 on 4 evaluation windows (508 predictions, so ±0.01; from round-to-nearest weights it was
0.9277, and the W8A8 PTQ recipe gives 0.9219 on the same windows, `make demo`).
The figures in bench/RESULTS.md come from 800 steps of batch 8 on a GPU (`--device cuda`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import graphopt
from graphopt.errors import GraphoptError
from graphopt.evaluation.lm import evaluate_causal_lm
from graphopt.frontends.corpora import lm_windows
from graphopt.passes.rotate import gain_matrices
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext
from graphopt.training import distillation, fake_quant

ROOT = Path(__file__).resolve().parent.parent
SENSITIVITY = ROOT / "samples" / "recipes" / "smollm2-rotated-sensitivity.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sample:smollm2", help="a causal LM (sample:tiny-llama for a quick look)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2, help="windows per step")
    parser.add_argument("--lr", type=float, default=4e-6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--int16-inputs", nargs="*", default=[], metavar="PATTERN",
                        help="weights (names, globs) whose inputs stay at 16 bits")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows")
    parser.add_argument("--length", type=int, default=128, help="tokens per window")
    parser.add_argument("-o", "--out", type=Path, default=ROOT / "out" / "qat")
    args = parser.parse_args(argv)
    try:
        run(args)
    except GraphoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run(args) -> None:
    start = time.perf_counter()
    fx = graphopt.load(args.model)
    get_pass("rotate")().run(fx, PassContext(progress=False))
    tokenizer = getattr(fx, "tokenizer", None)
    train_windows = lm_windows(tokenizer, "calib", max(16, args.steps * args.batch), args.length)
    calib = [{fx.inputs[0].name: w} for w in train_windows[:16]]

    student = fx.copy()
    ranking = str(SENSITIVITY) if args.model == "sample:smollm2" else ""
    inserted = get_pass("fake_quantize")(
        weight_bits=8, activation_bits=8, int16_budget=0.15 if ranking else 0.0, sensitivity=ranking,
        int16_inputs=tuple(args.int16_inputs), int16_weights=gain_matrices(fx), observer="mse",
        weight_rounding="gptq").run(student, PassContext(calib=calib))
    (act, of_act), (pts, of_pts) = inserted.stats["int16_share"].values()
    print(f"qat: 16-bit points: {act} of {of_act} activation points, {pts} of {of_pts} points with the weights")
    report = distillation.train(student, fx, train_windows, steps=args.steps, batch_size=args.batch, lr=args.lr,
                       loss="kd", temperature=1.0, warmup=max(1, args.steps // 20), device=args.device,
                       fused=args.device == "cpu")
    print(f"qat: {report.steps} steps in {report.seconds:.1f} s, KD loss {report.losses[0]:.4f} -> "
          f"{sum(report.losses[-5:]) / len(report.losses[-5:]):.4f} (last 5)")

    lowered = graphopt.lower(fake_quant.strip_fake_quant(student))
    encodings = fake_quant.export_encodings(student, lowered)
    encodings_path = encodings.write(args.out / f"{fx.name}-w8a8.encodings")
    lowered.meta.encodings = encodings.to_meta()
    folded = get_pass("fold_encodings")().run(lowered, PassContext(progress=False)).model
    model_path = folded.save(args.out / f"{fx.name}-w8a8-qat.onnx")
    print(f"qat: encodings {encodings_path}, static QDQ model {model_path}")

    fp32 = graphopt.load(args.model, form="onnx")  # the reference: rotation is exact in float
    eval_windows = lm_windows(tokenizer, "eval", args.windows, args.length)
    before, reference = evaluate_causal_lm(fp32, eval_windows)
    after, _ = evaluate_causal_lm(folded, eval_windows, reference)
    print(f"qat: on {args.windows} eval windows: ppl {before['ppl']:.3f} (float) -> {after['ppl']:.3f} "
          f"(QAT W8A8), overlap@1 {after['overlap@1']:.4f}; done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
