"""QAT end to end: fake-quantize a causal LM, distil it from its float model, fold the learned scales.

    python samples/qat.py [--model sample:smollm2] [--steps 40] [--batch 2] [--lr 4e-6] [--device cpu]
                          [--int16-inputs PATTERN ...] [-o out/qat]

1. Load the FX form and rotate its residual stream (the `rotate` pass, as the W8A8 recipe does).
2. `fake_quantize`: learnable quantizers at the points the `quantize` pass would use, 8-bit, the
   inputs of the weights `--int16-inputs` matches (e.g. '*.mlp.down_proj.weight') at 16 bits, and
   on SmolLM2 the recipe's sensitivity ranking up to 15 % of the activation points; ranges from
   the MSE observer, weights rounded by GPTQ.
3. `distillation.train` with a `TrainConfig`: full-vocabulary KD at T=1 against the float model
   (on the CPU with torch's fused fake-quant kernels).
4. Lower the student, export its scales as AIMET 1.0.0 encodings (`OUT/NAME-w8a8.encodings`), fold
   them into a static QDQ model (`OUT/NAME-w8a8-qat.onnx`) and compare it with the float model in
   onnxruntime: perplexity, top-1 agreement and the logits' SQNR on the evaluation windows.

The defaults are a short CPU run; the figures of full runs (800 steps of batch 8 on a GPU) are in
bench/RESULTS.md (suite `qat`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import graphopt
from graphopt.errors import GraphoptError
from graphopt.evaluation import metrics
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


def run(args) -> dict:
    """The four steps above; returns what the last line prints."""
    teacher = get_pass("rotate")().run(graphopt.load(args.model), PassContext(progress=False)).model
    name = teacher.inputs[0].name
    train_windows = lm_windows(teacher.tokenizer, "calib", max(16, args.steps * args.batch), args.length)
    calib = [{name: w} for w in train_windows[:16]]

    ranking = str(SENSITIVITY) if args.model == "sample:smollm2" else ""
    inserted = get_pass("fake_quantize")(
        weight_bits=8, activation_bits=8, int16_budget=0.15 if ranking else 0.0, sensitivity=ranking,
        int16_inputs=tuple(args.int16_inputs), int16_weights=gain_matrices(teacher), observer="mse",
        weight_rounding="gptq").run(teacher.copy(), PassContext(calib=calib))
    student = inserted.model
    (act, of_act), (pts, of_pts) = inserted.stats["int16_share"].values()
    print(f"qat: 16-bit points: {act} of {of_act} activation points, {pts} of {of_pts} points with the weights")

    config = distillation.TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, loss="kd", temperature=1.0,
                                      warmup=max(1, args.steps // 20), device=args.device, fused=args.device == "cpu")
    report = distillation.train(student, teacher, train_windows, config)
    print(f"qat: {report.steps} steps in {report.seconds:.1f} s, KD loss {report.losses[0]:.4f} -> "
          f"{np.mean(report.losses[-5:]):.4f} (last 5)")

    lowered = graphopt.lower(fake_quant.strip_fake_quant(student))
    encodings = fake_quant.export_encodings(student, lowered)
    encodings_path = encodings.write(args.out / f"{teacher.name}-w8a8.encodings")
    lowered.meta.encodings = encodings.to_meta()
    folded = get_pass("fold_encodings")().run(lowered, PassContext(progress=False)).model
    print(f"qat: encodings {encodings_path}, static QDQ model {folded.save(args.out / f'{teacher.name}-w8a8-qat.onnx')}")

    fp32 = graphopt.load(args.model, form="onnx")  # the reference: the rotation is exact in float
    eval_windows = lm_windows(teacher.tokenizer, "eval", args.windows, args.length)
    before, reference = evaluate_causal_lm(fp32, eval_windows)
    after, _ = evaluate_causal_lm(folded, eval_windows, reference)
    first = {name: eval_windows[0]}
    figures = {"ppl_float": before["ppl"], "ppl_qat": after["ppl"], "overlap@1": after["overlap@1"],
               "sqnr_db": metrics.sqnr_db(fp32.run(first)[0], folded.run(first)[0])}
    print(f"qat: on {args.windows} eval windows: ppl {figures['ppl_float']:.3f} (float) -> {figures['ppl_qat']:.3f} "
          f"(QAT W8A8), overlap@1 {figures['overlap@1']:.4f}, logits SQNR {figures['sqnr_db']:.1f} dB")
    return figures


if __name__ == "__main__":
    sys.exit(main())
