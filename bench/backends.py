"""The ort-mobile and qnn backends on real models: package sizes, validation, HTP findings, time.

    python bench/backends.py [MODEL ...] [--json PATH]

MODEL is `tiny` (sample:tiny-llama), `minilm` or `smollm2` (default: tiny minilm). Each model is
exported as fp32, as graphopt's W8A8 QDQ (the `quantize` pass, defaults) and, side by side, as
the peer tool's QDQ (onnxruntime `quantize_static`, QDQ format, per-channel int8 weights, uint8
activations, MatMul only), both calibrated on the same feeds (the model's sample inputs; for
SmolLM2 4 calibration windows of 64 tokens). Every package is validated the way `graphopt
convert` does it: the .ort against the ONNX model (float max |diff|, QDQ exact), the QNN package
rebuilt into QDQ and compared with the QDQ model (identical or not).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import onnx

import graphopt
from graphopt.files.writing import atomic_write_text
from graphopt.frontends.corpora import lm_windows
from graphopt.pipeline import Pipeline, export, get_pass

SOURCES = {"tiny": "sample:tiny-llama", "minilm": "sample:minilm", "smollm2": "sample:smollm2"}
COLUMNS = ["model", "variant", "backend", "MB", "main file MB", "emit+validate s", "check", "entries",
           "HTP rejects", "GMACs"]


def load(name: str, log):
    model = graphopt.load(SOURCES[name], form="onnx", log=log)
    if name == "smollm2":
        windows = lm_windows(model.tokenizer, "calib", 4, 64)
        model = model.replace(sample_inputs=[{"input_ids": w} for w in windows])
    return model


def graphopt_w8a8(model):
    pipeline = Pipeline([get_pass("quantize")()], verify=False, progress=False, log=lambda *a: None)
    return pipeline.run(model, calib=model.sample_inputs).model


def ort_w8a8(model, work: Path):
    """The peer tool: onnxruntime's own static QDQ quantization on the same calibration feeds."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.items = iter(model.sample_inputs)

        def get_next(self):
            return next(self.items, None)

    src, dst = work / "float.onnx", work / "ort_qdq.onnx"
    onnx.save(model.to_onnx(), src, save_as_external_data=True, location="float.onnx.data")
    quantize_static(str(src), str(dst), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                    use_external_data_format=True)
    return graphopt.load(str(dst)).replace(sample_inputs=model.sample_inputs, name=model.name, tokenizer=model.tokenizer)


def row(model_name: str, variant: str, backend: str, model, out: Path) -> dict:
    start = time.perf_counter()
    options = {"usability": False} if backend == "ort-mobile" else {}
    artifact = export(model, backend, out, options)
    seconds = time.perf_counter() - start
    sizes = {p.name: p.stat().st_size for p in artifact.files if p.exists()}
    main = "model.ort" if backend == "ort-mobile" else "model.encodings"
    v = artifact.validation
    if backend == "ort-mobile":
        check = "exact" if v["exact_required"] and v["max_abs_diff"] == 0 else f"max diff {v['max_abs_diff']:.1e}"
    else:
        check = "identical" if v["identical"] else "differs"
    report = artifact.report
    return {
        "model": model_name, "variant": variant, "backend": backend,
        "MB": round(sum(sizes.values()) / 1e6, 2), "main file MB": round(sizes.get(main, 0) / 1e6, 2),
        "emit+validate s": round(seconds, 1), "check": check,
        "entries": v.get("entries", "") if backend == "qnn" else "",
        "HTP rejects": report["htp"]["rejects"] if backend == "qnn" else "",
        "GMACs": round(report["macs_per_inference"] / 1e9, 3) if backend == "qnn" else "",
        "validation": v, "report": {k: v for k, v in report.items() if k != "operators"},
    }


def run(names: list[str], log) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-backends-") as tmp:
        tmp = Path(tmp)
        for name in names:
            model = load(name, log)
            work = tmp / name
            work.mkdir()
            variants = [("fp32", model), ("graphopt W8A8", graphopt_w8a8(model)), ("onnxruntime W8A8", ort_w8a8(model, work))]
            for variant, qdq in variants:
                for backend in ("ort-mobile", "qnn"):
                    log(f"backends: {name} {variant} -> {backend}")
                    rows.append(row(name, variant, backend, qdq, work / f"{variant.replace(' ', '-')}-{backend}"))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=["tiny", "minilm"], choices=sorted(SOURCES))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)
    rows = run(args.models, log)
    command = "python bench/backends.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"<!-- {command.strip()} -->")
    print(markdown(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps({"command": command.strip(), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
