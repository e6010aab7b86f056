"""Upgrading an ONNX model made at an older opset (a third-party file) to the opset the passes need.

The passes and backends work at opset >= MIN_OPSET (21: int4/int16 QDQ and blocked scales). A file
exported at opset 11-20 is upgraded with onnx's version converter, then checked numerically: the
original and the upgraded model run in onnxruntime on the same inputs (the caller's, e.g. the first
calibration feeds, else inputs synthesized from the declared shapes and dtypes) and must agree
within `ATOL` (relative to the outputs' largest magnitude) everywhere. Refused, with a
GraphoptError that says why: an op the converter has no adapter for (named), a model whose
outputs changed, an original that onnxruntime cannot run on the check's inputs, and a model
past protobuf's 2 GB that the converter cannot take.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.errors import UnsupportedGraphError
from graphopt.evaluation.metrics import cosine
from graphopt.ir import MIN_OPSET, Model, graph_opset

__all__ = ["OpsetUpgrade", "upgrade_opset", "synthesized_feeds", "ATOL"]

ATOL = 1e-4  # max |upgraded - original| / max(1, max |original|): float kernels may reorder sums, no more
_PROTOBUF_LIMIT = 2**31 - 1
_DYNAMIC_DIM = 32  # a synthesized dynamic axis: a multiple of the strides vision backbones need


@dataclass(frozen=True)
class OpsetUpgrade:
    """What an upgrade did and how close the upgraded model stayed to the original."""

    from_opset: int
    to_opset: int
    max_abs_diff: float
    cosine: float
    checked_on: str  # "given inputs" or "synthesized inputs"
    replaced_ops: dict  # op type -> count, of ops the converter replaced (e.g. {"Upsample": 2})

    def stats(self) -> dict:
        return {"from_opset": self.from_opset, "to_opset": self.to_opset, "max_abs_diff": self.max_abs_diff,
                "cosine": self.cosine, "checked_on": self.checked_on, "replaced_ops": self.replaced_ops}


def synthesized_feeds(model: Model, seed: int = 0) -> dict[str, np.ndarray]:
    """One feed per graph input from its declared dtype and shape: dynamic axes become 1 when
    first (a batch) and `_DYNAMIC_DIM` elsewhere; floats are N(0, 1), integers 0..9, bools random."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.inputs:
        shape = tuple(d if isinstance(d, int) and d > 0 else (1 if i == 0 else _DYNAMIC_DIM)
                      for i, d in enumerate(spec.shape))
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            feeds[spec.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def _convert(proto: onnx.ModelProto, target: int, where: str) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(proto, target)
    except (RuntimeError, onnx.checker.ValidationError, IndexError) as exc:
        message = str(exc).replace("\n", " ")
        ops = sorted(op for op in {n.op_type for n in proto.graph.node}
                     if re.search(rf"(?<![A-Za-z]){re.escape(op)}(?![A-Za-z])", message))
        named = f"op {', '.join(ops)}: " if ops else ""
        raise UnsupportedGraphError(
            f"{where}: onnx's version converter cannot take opset {graph_opset_of(proto)} to {target}: {named}"
            f"{message[-300:]}; export the model again at opset >= {target}") from None
    upgraded.ir_version = max(upgraded.ir_version, onnx.helper.find_min_ir_version_for(
        list(upgraded.opset_import), ignore_unknown=True))
    return upgraded


def graph_opset_of(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], where: str, which: str) -> list[np.ndarray]:
    from graphopt.ir.runtime import ort_session

    try:
        session = ort_session(proto, optimization="basic")
        return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    except Exception as exc:  # onnxruntime raises its own exception types for load and run failures
        raise UnsupportedGraphError(f"{where}: onnxruntime cannot run the {which} model on the check's inputs "
                                    f"({str(exc)[:300]})") from None


def upgrade_opset(model: Model, target: int = MIN_OPSET, feeds: dict[str, np.ndarray] | None = None) -> tuple[Model, OpsetUpgrade]:
    """The ONNX `model` at opset `target`, checked against the original on `feeds` (default:
    `synthesized_feeds`); `model` is not changed. Its metadata, task, tokenizer and sample inputs
    carry over. A model at `target` or later is returned as it is (with from_opset == to_opset)."""
    model.require("onnx", "upgrade_opset")
    where = f"model '{model.name}'"
    current = graph_opset(model.graph)
    if current >= target:
        return model, OpsetUpgrade(current, current, 0.0, 1.0, "nothing to check", {})
    proto = model.to_onnx()
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise UnsupportedGraphError(f"{where}: {proto.ByteSize():,} bytes, past the 2 GB onnx's version converter "
                                    f"can take; export it again at opset >= {target}")
    checked_on = "given inputs" if feeds else "synthesized inputs"
    feeds = feeds or synthesized_feeds(model)
    upgraded = _convert(proto, target, where)
    before = _run(proto, feeds, where, f"original (opset {current})")
    after = _run(upgraded, feeds, where, f"upgraded (opset {target})")
    worst, cos = 0.0, 1.0
    for name, a, b in zip((o.name for o in model.outputs), before, after):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise UnsupportedGraphError(f"{where}: output '{name}' is {list(a.shape)} before the upgrade to opset "
                                        f"{target} and {list(b.shape)} after it")
        if a.dtype.kind != "f":
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        else:
            diff = float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(a)))) if a.size else 0.0
            cos = min(cos, cosine(a, b, axis=None))
        if not np.isfinite(diff) or diff > ATOL:
            raise UnsupportedGraphError(f"{where}: output '{name}' differs by {diff:.3g} (relative) after onnx's "
                                        f"version converter took it from opset {current} to {target}; "
                                        f"export the model again at opset >= {target}")
        worst = max(worst, diff)
    replaced = _replaced(proto, upgraded)
    result = Model.from_onnx(upgraded, name=model.name, task=model.task, source=model.source,
                             tokenizer=model.tokenizer, sample_inputs=model.sample_inputs, meta=model.meta)
    return result, OpsetUpgrade(current, target, worst, cos, checked_on, replaced)


def _replaced(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, int]:
    """Op types the converter removed, with counts (Upsample -> Resize, Scatter -> ScatterElements)."""
    count = lambda p: {op: sum(n.op_type == op for n in p.graph.node) for op in {n.op_type for n in p.graph.node}}  # noqa: E731
    old, new = count(before), count(after)
    return {op: n - new.get(op, 0) for op, n in sorted(old.items()) if n > new.get(op, 0)}
