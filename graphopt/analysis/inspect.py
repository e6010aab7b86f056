"""What `graphopt inspect` reports: ops, sizes, signature, quantization and sparsity status."""

from __future__ import annotations

from collections import Counter

import numpy as np

from graphopt.analysis.diff import GraphView, distinct_params, view_of
from graphopt.ir import Model
from graphopt.sparsity.patterns import is_n_m

__all__ = ["summarize", "to_markdown", "SPARSE_THRESHOLD"]

SPARSE_THRESHOLD = 0.5  # an initializer is listed as sparse from this fraction of zeros
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Integer weights that hold quantized values; int64 (shapes, indices) and bool are not weights.
_QUANT_DTYPES = ("int4", "uint4", "int8", "uint8", "int16", "uint16", "int32")
_WEIGHT_OPS = {"MatMul": 0, "Gemm": 0, "Conv": 1, "aten.linear.default": 1, "aten.conv2d.default": 1,
               "aten.convolution.default": 1, "aten.mm.default": 0}


def _weight_in_axes(model: Model, view: GraphView) -> dict[str, int]:
    """weight name -> the axis that meets the activation, for weights of linear/conv ops.

    A weight reached through a DequantizeLinear counts as the consumer's weight.
    """
    dq_source = {}
    for node in view.nodes.values():
        if node.op == "DequantizeLinear" and node.inputs and node.inputs[0] in view.weights:
            dq_source[node.outputs[0]] = node.inputs[0]
    trans_b = {n.name: n.attrs.get("transB", 0) for n in model.graph.nodes if n.op == "Gemm"} if model.form == "onnx" else {}
    axes = {}
    for name, node in view.nodes.items():
        if node.op not in _WEIGHT_OPS or len(node.inputs) < 2:
            continue
        weight = dq_source.get(node.inputs[1], node.inputs[1])
        if weight not in view.weights:
            continue
        axis = _WEIGHT_OPS[node.op]
        if node.op == "Gemm":
            axis = 1 if trans_b.get(name) else 0
        axes[weight] = axis
    return axes


def _weights_of_interest(view: GraphView) -> list[str]:
    """Weights worth a sparsity check: at least 2-D, 64 elements, and not shapes or masks."""
    return [name for name, (shape, dtype, _) in view.weights.items()
            if len(shape) >= 2 and int(np.prod(shape)) >= 64 and dtype not in ("int64", "bool")]


def summarize(model: Model) -> dict:
    """A JSON-able description of `model` (either form)."""
    view = view_of(model)
    ops = Counter(node.op for node in view.nodes.values())
    quant_weights: Counter = Counter()
    quant_params: Counter = Counter()
    for shape, dtype, _ in view.weights.values():
        if dtype in _QUANT_DTYPES:
            quant_weights[dtype] += 1
            quant_params[dtype] += int(np.prod(shape))
    fake_quant = sum(n for op, n in ops.items() if model.form == "fx" and "quantize" in op)
    qdq = {op: ops.get(op, 0) for op in _QDQ_OPS}

    in_axes = _weight_in_axes(model, view)
    sparse = []
    for name in _weights_of_interest(view):
        values = view.values(name)
        zeros = 1.0 - np.count_nonzero(values) / values.size
        if zeros < SPARSE_THRESHOLD:
            continue
        row = {"name": name, "shape": list(values.shape), "zeros": round(float(zeros), 4)}
        if name in in_axes and is_n_m(values, in_axes[name], 2, 4):
            row["pattern"] = "2:4"
        sparse.append(row)
    mask_patterns = Counter(str(rec.get("pattern", "?")) if isinstance(rec, dict) else "?"
                            for rec in model.meta.masks.values())

    return {
        "name": model.name,
        "form": model.form,
        "task": model.task,
        "nodes": len(view.nodes),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "params": distinct_params(view.weights, view.values),
        "initializers": len(view.weights),
        "bytes": sum(b for _, _, b in view.weights.values()),
        "inputs": view.inputs,
        "outputs": view.outputs,
        "quantization": {
            **qdq,
            "fake_quant_ops": fake_quant,
            "integer_weights": {d: {"count": quant_weights[d], "params": quant_params[d]} for d in sorted(quant_weights)},
            "encodings": len(model.meta.encodings),
            "quantized": bool(sum(qdq.values()) or fake_quant or quant_weights or model.meta.encodings),
        },
        "sparsity": {
            "sparse_initializers": sparse,
            "n_m": {"2:4": sum(1 for row in sparse if row.get("pattern") == "2:4")},
            "masks": len(model.meta.masks),
            "mask_patterns": dict(mask_patterns),
        },
    }


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _shape(shape) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def to_markdown(summary: dict, *, top: int = 25) -> str:
    """A readable report of `summarize(...)`; plain Markdown that also reads well in a terminal."""
    s = summary
    lines = [
        f"# {s['name']} ({s['form'].upper()}, {s['task']})",
        "",
        f"- nodes: {s['nodes']:,}",
        f"- parameters: {s['params']:,} ({_human(s['params'])})",
        f"- weights: {s['initializers']:,} tensors, {s['bytes']:,} bytes ({_human(s['bytes'])}B)",
        "",
        "## Inputs and outputs",
        "",
        "| | name | dtype | shape |",
        "|---|---|---|---|",
    ]
    lines += [f"| input | {v['name']} | {v['dtype']} | {_shape(v['shape'])} |" for v in s["inputs"]]
    lines += [f"| output | {v['name']} | {v['dtype']} | {_shape(v['shape'])} |" for v in s["outputs"]]
    lines += ["", "## Ops", "", "| op | count |", "|---|---|"]
    ops = list(s["ops"].items())
    lines += [f"| {op} | {n:,} |" for op, n in ops[:top]]
    if len(ops) > top:
        lines.append(f"| ({len(ops) - top} more types) | {sum(n for _, n in ops[top:]):,} |")

    q = s["quantization"]
    lines += ["", "## Quantization", ""]
    if not q["quantized"]:
        lines.append("- not quantized")
    else:
        lines.append(f"- QuantizeLinear: {q['QuantizeLinear']}, DequantizeLinear: {q['DequantizeLinear']}"
                     + (f", fake-quant ops: {q['fake_quant_ops']}" if q["fake_quant_ops"] else ""))
        for dtype, row in q["integer_weights"].items():
            lines.append(f"- {dtype} weights: {row['count']} tensors, {row['params']:,} values")
        lines.append(f"- encodings in metadata: {q['encodings']}")

    sp = s["sparsity"]
    lines += ["", "## Sparsity", ""]
    if not sp["sparse_initializers"] and not sp["masks"]:
        lines.append(f"- no weight with ≥ {int(SPARSE_THRESHOLD * 100)}% zeros, no masks")
    else:
        lines.append(f"- weights with ≥ {int(SPARSE_THRESHOLD * 100)}% zeros: {len(sp['sparse_initializers'])}"
                     f" (2:4 along the input dim: {sp['n_m']['2:4']})")
        lines.append(f"- masks in metadata: {sp['masks']}"
                     + (" (" + ", ".join(f"{p}: {n}" for p, n in sp["mask_patterns"].items()) + ")" if sp["masks"] else ""))
        for row in sp["sparse_initializers"][:top]:
            lines.append(f"  - {row['name']} {_shape(row['shape'])}: {100 * row['zeros']:.1f}% zeros"
                         + (f", {row['pattern']}" if row.get("pattern") else ""))
    return "\n".join(lines) + "\n"
