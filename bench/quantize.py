"""Quantization on SmolLM2 next to ONNX Runtime's own quantizers; MiniLM W8A8 embedding cosine.

    python bench/quantize.py [--json PATH] [--windows 24] [--calib 16] [--only NAME ...] [--ort-config KEY=VALUE ...]

Rows, all measured in the same run on the same data: fp32; ONNX Runtime `quantize_static` (QDQ,
per-channel int8 weights, MinMax, its default int8 activations, the same calibration windows; the
table Gather excluded, see `_table_gathers`) with its default op types and with MatMul only (run
at onnxruntime's "basic" optimisation level, the only one that accepts that model),
`quantize_dynamic` (int8 MatMul weights), `MatMulNBits` (4-bit, block 32, symmetric); graphopt's
recipes samples/recipes/smollm2-{w8a8,w8a8-gptq,w8a16,w4a16}.yaml. Protocol as bench/fidelity.py: 24
evaluation windows x 128 tokens, overlap@k against fp32, latency of one batch-1 run at 128
tokens on onnxruntime CPU; "quantize s" is calibration + quantization wall time (for ORT's tools
including their file I/O, which they require). MiniLM: mean cosine of the sentence embedding of
graphopt's minilm-w8a8 recipe vs fp32 over 8 evaluation batches of 8 sentences.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import graphopt
from graphopt.errors import GraphoptError
from graphopt.evaluation import metrics
from graphopt.evaluation.lm import benchmark_causal_lm
from graphopt.evaluation.sizes import disk_bytes
from graphopt.evaluation.tables import environment, markdown_table
from graphopt.files.writing import atomic_write_text
from graphopt.frontends.corpora import lm_windows, minilm_batches
from graphopt.ir import Model
from graphopt.ir.onnx_files import load_onnx

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {name: ROOT / "samples" / "recipes" / f"smollm2-{name}.yaml" for name in ("w8a8", "w8a8-gptq", "w8a16", "w4a16")}
COLUMNS = ["ppl", "ppl_ratio", "overlap@1", "overlap@8", "bytes", "size_ratio", "quantize_s", "latency_ms",
           "latency_min_ms"]
ALL = ["ort-static", "ort-static-matmul", "ort-dynamic", "ort-matmulnbits-w4", "graphopt-w8a8", "graphopt-w8a8-gptq",
       "graphopt-w8a16", "graphopt-w4a16", "minilm"]


def _ort_static(src: Path, out: Path, calib_windows, **options) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input_ids": w} for w in calib_windows])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                    nodes_to_exclude=_table_gathers(src), **options)


def _ort_static_matmul(src: Path, out: Path, calib_windows) -> None:
    _ort_static(src, out, calib_windows, op_types_to_quantize=["MatMul"])


def _table_gathers(src: Path) -> list[str]:
    """Gathers reading a weight table. quantize_static(per_channel=True) gives their output the
    table's per-axis scale, which onnxruntime then refuses to run ("scale must be 1D tensor with
    size 1"); excluded, the table is still quantized as the tied lm_head's MatMul weight."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    tables = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in tables]


def _ort_dynamic(src: Path, out: Path, _calib) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     use_external_data_format=True)


def _ort_nbits(src: Path, out: Path, _calib) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)


ORT_TOOLS = {"ort-static": _ort_static, "ort-static-matmul": _ort_static_matmul, "ort-dynamic": _ort_dynamic,
             "ort-matmulnbits-w4": _ort_nbits}
# onnxruntime's default session refuses its own MatMul-only QDQ model of SmolLM2 ("Node (view_1_q)
# ... output_dtype INT8 does not match y_zero_point type UINT8", from a fusion); "basic" runs it
OPTIMIZATION = {"ort-static-matmul": "basic"}


def _row(name, model, eval_windows, reference, fp32_row, seconds, args):
    row, _ = benchmark_causal_lm(model, eval_windows, reference, latency_seq=args.length,
                                            latency_repeats=args.latency_repeats, threads=args.threads,
                                            optimization=OPTIMIZATION.get(name, "all"), config=args.ort_config)
    row = {"name": name, **row, "quantize_s": seconds}
    if fp32_row:
        row["ppl_ratio"] = row["ppl"] / fp32_row["ppl"]
        row["size_ratio"] = row["bytes"] / fp32_row["bytes"]
    return row


def run(args, log) -> dict:
    wanted = args.only or ALL
    fp32 = graphopt.load("sample:smollm2", form="onnx", log=log)
    eval_windows = lm_windows(fp32.tokenizer, "eval", args.windows, args.length)
    calib_windows = lm_windows(fp32.tokenizer, "calib", args.calib, args.length)
    log(f"quantize bench: fp32 on {args.windows} x {args.length} eval tokens...")
    fp32_row, reference = benchmark_causal_lm(
        fp32, eval_windows, latency_seq=args.length, latency_repeats=args.latency_repeats, threads=args.threads,
        config=args.ort_config)
    rows = [{"name": "fp32", **fp32_row, "ppl_ratio": 1.0, "size_ratio": 1.0, "quantize_s": 0.0}]
    with tempfile.TemporaryDirectory(prefix="graphopt-qbench-") as tmp:
        tmp = Path(tmp)
        src = fp32.replace(source=None).save(tmp / "fp32" / "model.onnx")
        for name, tool in ORT_TOOLS.items():
            if name not in wanted:
                continue
            log(f"quantize bench: {name}...")
            out = tmp / name / "model.onnx"
            out.parent.mkdir()
            start = time.perf_counter()
            tool(src, out, calib_windows)
            seconds = time.perf_counter() - start
            model = Model.from_onnx(load_onnx(out), name=name, task="causal-lm")
            rows.append(_row(name, model, eval_windows, reference, fp32_row, seconds, args))
            log(f"quantize bench: {rows[-1]}")
            del model
            gc.collect()
    from graphopt.recipe import load_recipe

    for key, path in RECIPES.items():
        name = f"graphopt-{key}"
        if name not in wanted:
            continue
        log(f"quantize bench: {name} ({path.name})...")
        recipe = load_recipe(path)
        start = time.perf_counter()
        result = graphopt.Pipeline(recipe.passes, verify=False, progress=False, log=log).run(
            fp32, calib=recipe.calibration_feeds(fp32))
        seconds = time.perf_counter() - start
        row = _row(name, result.model, eval_windows, reference, fp32_row, seconds, args)
        quantize_step = next((s for s in result.report.steps if s.name == "quantize"), None)
        row["int16_points"] = (quantize_step.stats.get("int16_points") if quantize_step else None)
        rows.append(row)
        log(f"quantize bench: {row}")
        del result
        gc.collect()
    minilm = minilm_cosine(log) if "minilm" in wanted else None
    return {
        "model": "smollm2",
        "protocol": {"split": "eval", "windows": args.windows, "length": args.length, "calibration_windows": args.calib,
                     "reference": "fp32", "latency": {"seq": args.length, "batch": 1, "repeats": args.latency_repeats,
                                                      "threads": args.threads or "ort default"},
                     "ort_config": args.ort_config},
        "machine": environment(),
        "rows": rows,
        "minilm": minilm,
    }


def minilm_cosine(log) -> dict:
    """graphopt W8A8 MiniLM (its recipe) vs fp32: mean cosine of the sentence embeddings."""
    from graphopt.recipe import load_recipe

    fp32 = graphopt.load("sample:minilm", form="onnx", log=log)
    recipe = load_recipe(ROOT / "samples" / "recipes" / "minilm-w8a8.yaml")
    start = time.perf_counter()
    result = graphopt.Pipeline(recipe.passes, verify=False, progress=False, log=log).run(
        fp32, calib=recipe.calibration_feeds(fp32))
    seconds = time.perf_counter() - start
    batches = minilm_batches(fp32.tokenizer, "eval", 8)
    run_fp32, run_q = fp32.runner(), result.model.runner()
    cosines = [metrics.cosine(run_fp32(b)[0], run_q(b)[0], axis=-1) for b in batches]
    row = {"name": "graphopt-minilm-w8a8", "cosine": float(np.mean(cosines)), "min_batch_cosine": float(np.min(cosines)),
           "bytes": disk_bytes(result.model), "fp32_bytes": disk_bytes(fp32), "quantize_s": seconds}
    log(f"quantize bench: {row}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT decides)")
    parser.add_argument("--only", nargs="*", choices=ALL, help="measure only these rows (fp32 always)")
    parser.add_argument("--ort-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="onnxruntime session config entries for every evaluated model, e.g. "
                             "session.qdq_matmulnbits_accuracy_level=1")
    args = parser.parse_args(argv)
    malformed = [e for e in args.ort_config if "=" not in e]
    if malformed:
        parser.error(f"--ort-config: '{malformed[0]}' is not KEY=VALUE")
    args.ort_config = dict(e.split("=", 1) for e in args.ort_config)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    try:
        data = run(args, log)
    except GraphoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data["command"] = "python bench/quantize.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(markdown_table(data["rows"], COLUMNS), end="")
    if data["minilm"]:
        m = data["minilm"]
        print(f"\nMiniLM W8A8 (graphopt): mean embedding cosine {m['cosine']:.4f} (min batch {m['min_batch_cosine']:.4f}), "
              f"{m['bytes'] / 1e6:.1f} MB vs {m['fp32_bytes'] / 1e6:.1f} MB fp32, quantize {m['quantize_s']:.1f} s")
    if args.json:
        atomic_write_text(args.json, json.dumps(data, indent=2, default=float))
        log(f"quantize bench: rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
