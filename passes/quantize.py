"""quantize: static QDQ quantization of an ONNX graph, calibrated, with mixed precision."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.capture import InputHessian, capture, progress_bar
from graphopt.analysis.linear_sites import linear_sites
from graphopt.errors import UnsupportedGraphError
from graphopt.ir import MIN_OPSET, Model, consumers, graph_opset
from graphopt.ir.decoder import position_tables
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant import QuantSpec, numerics, qdq
from graphopt.quant.encodings import Encoding, Encodings
from graphopt.quant.gptq import GPTQResult, gptq_quantize
from graphopt.quant.observers import make_observer
from graphopt.quant.plan import QuantOptions, check_weight_patterns, folded_gains, plan_int16
from graphopt.quant.scale_search import estimate_scales, refit_scales

__all__ = ["Quantize"]


class _Tee:
    """One capture accumulator feeding several (an activation's observer and its Hessian for GPTQ)."""

    def __init__(self, *parts):
        self.parts = parts

    def update(self, x: np.ndarray) -> None:
        for part in self.parts:
            part.update(x)


@register_pass
@dataclass(frozen=True)
class Quantize(QuantOptions, Pass):
    """Quantize weights and the activations entering compute ops, statically (QDQ).

    Reads calibration feeds (`ctx.calib`) unless activations are left float and rounding is RTN;
    optionally a sensitivity ranking JSON. The options are `graphopt.quant.plan.QuantOptions`,
    shared with `fake_quantize` (same names, defaults and choice of 16-bit points). Rewrites:

    1. Weights of MatMul/Gemm/Conv (and tables read by Gather, e.g. a tied embedding/lm_head)
       become integer initializers + DequantizeLinear: per channel (the output axis), per tensor,
       or per block along the input axis (opset 21 `block_size`); with `weight_offset`, a MatMul
       weight's codes have zero point 0 and each group's float offset (its minimum) is added back as
       MatMul(block sums of the input, offsets) (graphopt.quant.qdq.add_weight_offsets); RTN with min-max or MSE-clipped
       ranges, or GPTQ (graphopt.quant.gptq; `gptq_damp`, `gptq_act_order`) on the same grids. With
       `scale_estimation`, a MatMul weight's scales are then refit to its output error on the
       calibration inputs (graphopt.quant.scale_search: for GPTQ's codes once, for RTN alternating
       with rounding; never worse than without, on those inputs). Tables use `embedding_bits` per
       channel (or `embedding_block_size` symmetric blocks) and RTN (their rounding serves the lookup as much as the lm_head). Weights matching
       `int16_weights` get 16 bits per channel (e.g. the near-identity MatMul `rotate` makes), those
       matching `int8_weights` 8 bits per channel (a 4-bit recipe's most sensitive weights);
       weights matching `exclude` stay float, and so does an input only they read. With
       `half_scales` (RTN only) the scales and offsets are float16 values (`store_half` writes them so).
    2. Activations entering those ops get QuantizeLinear → DequantizeLinear (per tensor, range from
       the `observer` over the calibration feeds); `plan_int16` picks the 16-bit ones: the inputs
       of weights matching `int16_inputs`, then the most sensitive up to `int16_budget` (by the
       `sensitivity` JSON, else the lowest estimated SQNR at 8 bits).
    3. With `quantize_bias`, biases of quantized linears become int32 with scale s_x·s_w.
    Does NOT fire on a graph with no float constant weight in a MatMul/Gemm/Conv (e.g. an already
    quantized one): `changed` is False and the model is untouched. SmoothQuant is its own pass
    (`smooth_quant`), run before this one.

    Guarantees: the result runs in onnxruntime; weights under a sparsity mask (`model.meta.masks`)
    stay exactly zero. Leaves every encoding in `model.meta.encodings` (graphopt.quant.encodings form).
    """

    name: ClassVar[str] = "quantize"
    mutates_input: ClassVar[bool] = True

    # off by default: ORT 1.32's CPU fusions (MatMulIntegerToFloat / QGemm without an output Q)
    # compute wrong results with a DQ'd int32 bias (max error 0.8 vs 0.02 unfused, see the tests);
    # QNN and the NPU simulator derive bias encodings from s_x·s_w themselves
    quantize_bias: bool = field(default=False, metadata={"help": "int32 biases of quantized linears"})
    gptq_damp: float = field(default=0.01, metadata={"help": "GPTQ: share of mean(diag H) added to H's diagonal, in [0, 1)"})
    gptq_act_order: bool = field(default=False, metadata={
        "help": "GPTQ: round input rows by descending Hessian diagonal (block scales fixed before the sweep)"})
    scale_estimation: bool = field(default=False, metadata={
        "help": "refit MatMul weight scales to each layer's output error on the calibration inputs"})

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.gptq_damp < 1.0:
            raise self.option_error("gptq_damp", f" must be in [0, 1), got {self.gptq_damp}")
        if self.weight_offset and (self.weight_rounding != "rtn" or self.weight_range != "minmax"
                                   or self.scale_estimation):
            raise self.option_error("weight_offset", " takes each group's exact min-max range: it needs weight_rounding "
                                                     "'rtn', weight_range 'minmax' and no scale_estimation")
        if self.half_scales and (self.weight_rounding != "rtn" or self.scale_estimation):
            raise self.option_error("half_scales", " rounds the scales before the codes are chosen: it needs "
                                                   "weight_rounding 'rtn' and no scale_estimation")
        if self.scale_estimation and self.weight_granularity == "tensor":
            raise self.option_error("scale_estimation", " needs weight scales per channel or per block, "
                                                        "not weight_granularity 'tensor'")

    # ---------------------------------------------------------------------------- entry
    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        opset = graph_opset(graph)
        if opset and opset < MIN_OPSET:
            raise UnsupportedGraphError(
                f"'quantize': graph '{model.name}' has opset {opset}; QDQ with int4/16 and blocks needs "
                f">= {MIN_OPSET}: run the upgrade_opset pass before it (a Pipeline does so by itself)")
        sites = [s for s in linear_sites(model) if not self.excluded(s.weight)]
        if not sites:
            return PassResult(model, False, {"reason": "no float MatMul/Gemm/Conv weight to quantize"})
        feeds: dict[str, list[str]] = OrderedDict()  # activation point -> the weights it feeds
        for site in sites if self.activation_bits else ():
            feeds.setdefault(site.activation, []).append(site.weight)
        points, weights = list(feeds), {s.weight for s in sites}
        folded = folded_gains(model.meta)
        check_weight_patterns(self, weights, model.name, folded)
        calib = ctx.require_calib(self.name) if points or self._needs_hessians else None
        observers, hessians = self._calibrate(model, sites, points, calib, ctx)
        proxy_spec = self.activation_spec(8)
        plan = plan_int16(self, list(feeds.values()), weights, model.name,
                          proxy=lambda: [observers[p].sqnr_db(proxy_spec) for p in points], folded=folded)
        int16 = [p for i, p in enumerate(points) if i in plan.wide]
        encodings = Encodings()
        for i, point in enumerate(points):
            spec = self.activation_spec(16 if i in plan.wide else None)
            encodings.add(Encoding.from_params(point, *observers[point].params(spec), spec), "activation")
        tensors = graph.tensors()
        offsets: dict[str, tuple[np.ndarray, QuantSpec]] = {}
        codes = self._weight_encodings(model, sites, tensors, hessians, encodings, ctx, offsets)
        result = qdq.apply_encodings(graph, encodings, codes=codes, quantize_bias=self.quantize_bias)
        corrected = qdq.add_weight_offsets(graph, offsets)
        _check_masks(model, encodings, tensors)
        model.meta.encodings.update(encodings.to_meta())
        return PassResult(model, True, {
            "weights": len(result.weights), "activations": len(result.activations), "int16_points": len(int16),
            "offset_weights": len(corrected),
            "biases": len(result.biases), "int16_share": plan.share, "int16": int16[:64]})

    # ----------------------------------------------------------------- calibration
    @property
    def _needs_hessians(self) -> bool:
        return self.weight_rounding == "gptq" or self.scale_estimation

    def _calibrate(self, model, sites, points, calib, ctx) -> tuple[dict, dict]:
        """Observers of `points` and, for GPTQ or scale estimation, the input Hessians of MatMul
        sites: one calibration run."""
        if not points and not self._needs_hessians:
            return {}, {}
        options = {"percentile": self.percentile} if self.observer == "percentile" else {}
        observers = {p: make_observer(self.observer, **options) for p in points}
        hessians = {s.activation: InputHessian() for s in sites if s.op == "MatMul"} if self._needs_hessians else {}

        def make(name):
            parts = [x for x in (observers.get(name), hessians.get(name)) if x is not None]
            return parts[0] if len(parts) == 1 else _Tee(*parts)

        capture(model, calib, list(dict.fromkeys([*points, *hessians])), make, progress=ctx.progress,
                desc="quantize: calibrating")
        return observers, hessians

    # ----------------------------------------------------------------------- weights
    def _weight_encodings(self, model, sites, tensors, hessians, encodings: Encodings, ctx, offsets: dict) -> dict:
        """Each weight's encoding into `encodings`; returns the codes chosen here (GPTQ, scale
        estimation, offsets) by weight name, and fills `offsets` {MatMul weight: (offset, spec)}."""
        readers = consumers(model.graph)
        users = {n: readers[id(t)] for n, t in tensors.items() if isinstance(t, gs.Constant) and id(t) in readers}
        names = list(OrderedDict.fromkeys(s.weight for s in sites))
        positions = position_tables(model)  # a decoder's rotary tables: position data, not weights
        tables = [n for n, readers in users.items() if any(r.op == "Gather" and r.inputs[0].name == n for r in readers)
                  and tensors[n].values.ndim == 2 and tensors[n].values.dtype == np.float32 and not self.excluded(n)
                  and n not in positions]
        names += [t for t in tables if t not in names]
        site_of = {s.weight: s for s in sites}
        specs = {}
        for name in names:
            channel_axis, block_axis = qdq.weight_axes(model.graph, tensors[name], users[name])
            specs[name] = self.weight_spec(name, channel_axis, table=name in tables, block_axis=block_axis)
        # GPTQ and scale estimation for linear weights (a table's rounding must serve its lookups
        # too: RTN there)
        calibrated = {n: hessians[site_of[n].activation] for n in names if n not in tables and n in site_of
                      and site_of[n].op == "MatMul" and site_of[n].activation in hessians}
        found = {}
        groups = _shared_input_groups(list(calibrated), site_of, specs) if self.weight_rounding == "gptq" else []
        for group in progress_bar(groups, len(groups), "quantize: GPTQ", ctx.progress and bool(groups)):
            found.update(_gptq_group(group, tensors, specs[group[0]], calibrated[group[0]].hessian, model.meta.masks,
                                     self.weight_range, damp=self.gptq_damp, act_order=self.gptq_act_order))
        codes = {}
        for name in progress_bar(names, len(names), "quantize: weights", ctx.progress):
            spec = specs[name]
            values = np.asarray(tensors[name].values, np.float32)
            code = None
            if self.weight_offset and not spec.symmetric and spec.granularity != "tensor" and name in site_of \
                    and site_of[name].op == "MatMul" and name not in tables:
                scale, offset = numerics.offset_params(values, spec)
                if self.half_scales:
                    scale, offset = _half(name, scale, positive=True), _half(name, offset)
                zero_point = np.zeros(scale.shape, np.int64)
                code = numerics.quantize_with_offset(values, scale, offset, spec)
                offsets[name] = (offset, spec)
            elif name in found:
                scale, zero_point, code = found[name].scale, found[name].zero_point, found[name].codes
            elif self.weight_range == "mse":
                scale, zero_point = numerics.mse_params(values, spec)
            else:
                scale, zero_point = numerics.params_for(values, spec)
            if self.half_scales and name not in offsets:
                scale = _half(name, scale, positive=True)
            if self.scale_estimation and name in calibrated and spec.granularity != "tensor":
                hessian = calibrated[name].hessian
                if code is None:
                    code, scale = estimate_scales(values, hessian, scale, zero_point, spec)
                else:
                    scale = refit_scales(values, hessian, code, scale, zero_point, spec)
            if code is not None:
                codes[name] = np.asarray(code).astype(np.int32).astype(spec.np_dtype)
            encodings.add(Encoding.from_params(name, scale, zero_point, spec), "param")
        return codes


def _half(weight: str, values: np.ndarray, *, positive: bool = False) -> np.ndarray:
    try:
        return numerics.to_half(values, positive=positive)
    except OverflowError as exc:
        raise UnsupportedGraphError(f"'quantize': option 'half_scales': weight '{weight}' has a scale or offset "
                                    f"float16 cannot hold ({exc})") from exc


def _shared_input_groups(names: list[str], site_of: dict, specs: dict) -> list[list[str]]:
    """Weights that read the same activation with the same per-channel/per-block spec (q/k/v,
    gate/up): GPTQ solves them as one wider weight, the Hessian factored once."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        spec = specs[name]
        key = (site_of[name].activation, spec) if spec.granularity != "tensor" else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _gptq_group(names: list[str], tensors, spec: QuantSpec, hessian, masks, grid: str, **options) -> dict:
    """GPTQ of [in, out] weights side by side (output channels are independent), split back;
    `options` are gptq_quantize's (damp, act_order)."""
    values = [np.asarray(tensors[n].values, np.float32) for n in names]
    mask = None
    if any(n in masks for n in names):
        mask = np.concatenate([(v != 0) if n in masks else np.ones(v.shape, bool) for n, v in zip(names, values)], axis=1)
    joint = gptq_quantize(np.concatenate(values, axis=1), hessian, spec, mask=mask, grid=grid, **options)
    out, start = {}, 0
    for name, value in zip(names, values):
        part = slice(start, start + value.shape[1])
        start = part.stop
        out[name] = GPTQResult(joint.dequantized[:, part], joint.codes[:, part],
                               joint.scale[..., part], joint.zero_point[..., part])
    return out


def _check_masks(model: Model, encodings: Encodings, tensors) -> None:
    """Pruned weights must dequantize to exactly 0 (symmetric/zero-point math guarantees it for RTN)."""
    for name in model.meta.masks:
        if name not in encodings.params or name not in tensors:
            continue
        original = tensors[name]
        dq = next((n for n in model.graph.nodes if n.op == "DequantizeLinear" and n.outputs[0].name == name), None)
        if dq is None or not isinstance(original, gs.Constant):
            continue
        enc = encodings.params[name]
        scale, zp = enc.params(dq.inputs[0].values.shape)
        back = numerics.dequantize(dq.inputs[0].values, scale, zp, enc.spec)
        zeros = np.asarray(original.values) == 0
        if np.any(back[zeros] != 0):
            raise UnsupportedGraphError(f"'quantize': pruned zeros of weight '{name}' did not survive quantization")
