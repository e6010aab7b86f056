"""quantize: static QDQ quantization of an ONNX graph, calibrated, with mixed precision and SmoothQuant."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.capture import InputHessian, capture, progress_bar
from graphopt.analysis.linear_sites import linear_sites
from graphopt.analysis.sensitivity import int16_budget_count, int16_share, read_sensitivity
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir import MIN_OPSET, Model, consumers
from graphopt.ir.names import name_matches
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant import QuantSpec, dtype_for, numerics, qdq
from graphopt.quant.encodings import Encoding, Encodings
from graphopt.quant.gptq import GPTQResult, gptq_quantize
from graphopt.quant.observers import MinMaxObserver, make_observer

__all__ = ["Quantize"]


RECORDING_LIMIT = 2 << 30  # bytes of smoothed-point activations kept to avoid a second calibration run


class _Recorder:
    """Keeps every batch it sees (float32) in `batches`."""

    def __init__(self, batches: list):
        self.batches = batches

    def update(self, x: np.ndarray) -> None:
        self.batches.append(np.asarray(x, np.float32))


def _recording_bytes(model: Model, calib, plans: dict) -> int:
    """What recording the planned points over `calib` would hold: rows x widths x 4 bytes, with
    a feed's rows the element count of its first input (tokens of input_ids)."""
    first = model.inputs[0].name
    rows = sum(int(np.prod(np.shape(feed[first]))) for feed in calib)
    tensors = model.graph.tensors()
    widths = sum(int(tensors[consumers[0].weight].values.shape[0]) for _, consumers in plans.values())
    return rows * widths * 4


class _Tee:
    """One capture accumulator feeding several (an observer and a Hessian for GPTQ)."""

    def __init__(self, *parts):
        self.parts = parts

    def update(self, x: np.ndarray) -> None:
        for part in self.parts:
            part.update(x)


def _graph_opset(graph: gs.Graph) -> int:
    for entry in graph.import_domains or []:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return int(graph.opset or 0)


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Quantize weights and the activations entering compute ops, statically (QDQ).

    Reads calibration feeds (`ctx.calib`) unless activations are left float and rounding is RTN;
    optionally a sensitivity ranking JSON. Rewrites, in order:

    1. SmoothQuant (`smoothquant_alpha` > 0; with `smoothquant_weights`, only the inputs of the
       linears those patterns name): for an activation read only by linear layers, per
       channel factors s (numerics.smooth_scales) divide the activation, folded into its producer
       (the norm's Mul by a constant weight, the linear whose output it multiplies elementwise
       (SwiGLU's up_proj), or the linear that produces it) and multiply the consumers' weight rows.
       Does NOT fire when the producer is anything else or a weight is shared outside the match.
    2. Weights of MatMul/Gemm/Conv (and tables read by Gather, e.g. a tied embedding/lm_head)
       become integer initializers + DequantizeLinear: per channel (the output axis), per tensor,
       or per block along the input axis (opset 21 `block_size`); RTN with min-max or MSE-clipped
       ranges, or GPTQ (graphopt.quant.gptq) on the same grids. Tables use `embedding_bits` per
       channel and RTN (their rounding serves the lookup as much as the lm_head). Weights named
       in `int16_weights` get 16 bits per channel (e.g. the near-identity MatMul `rotate` makes).
    3. Activations entering those ops get QuantizeLinear → DequantizeLinear (per tensor, range from
       the `observer` over the calibration feeds); the points in `int16_points`, plus the most
       sensitive points (sensitivity JSON, or the lowest estimated SQNR when none is given) up to
       `int16_budget` × the number of activation points (`int16_budget_over` "activations") or of
       all points, weights included, less the 16-bit weights ("points"), get 16 bits.
    4. With `quantize_bias`, biases of quantized linears become int32 with scale s_x·s_w.
    Does NOT fire on a graph with no float constant weight in a MatMul/Gemm/Conv (e.g. an already
    quantized one): `changed` is False and the model is untouched.

    Guarantees: the result runs in onnxruntime; weights under a sparsity mask (`model.meta.masks`)
    stay exactly zero. Leaves every encoding in `model.meta.encodings` (graphopt.quant.encodings form).
    """

    name: ClassVar[str] = "quantize"
    mutates_input: ClassVar[bool] = True

    weight_bits: int = field(default=8, metadata={"help": "4, 8 or 16"})
    weight_granularity: Literal["tensor", "channel", "block"] = field(default="channel", metadata={"help": "weight scales"})
    weight_block_size: int = field(default=64, metadata={"help": "input rows per scale when weight_granularity is block"})
    # asymmetric uint8 by default: ONNX Runtime's AVX2 (non-VNNI) u8s8 integer kernels saturate
    # their int16 pair sums, which wrecked SmolLM2 (ppl 9057 fused vs 28.7 unfused); u8u8 does not.
    # NPUs that want symmetric int8 weights set this true.
    weight_symmetric: bool = field(default=False, metadata={"help": "signed codes, zero point 0"})
    weight_range: Literal["minmax", "mse"] = field(default="minmax", metadata={"help": "weight clipping: full range or MSE-optimal"})
    weight_rounding: Literal["rtn", "gptq"] = field(default="rtn", metadata={"help": "round to nearest, or GPTQ (needs calibration)"})
    embedding_bits: int = field(default=0, metadata={"help": "bits of Gather tables (0: weight_bits); per channel"})
    activation_bits: int = field(default=8, metadata={"help": "8 or 16; 0 leaves activations float (weight-only)"})
    activation_symmetric: bool = field(default=False, metadata={"help": "signed activations, zero point 0"})
    observer: Literal["minmax", "percentile", "mse"] = field(default="minmax", metadata={"help": "activation range"})
    percentile: float = field(default=99.99, metadata={"help": "for observer: percentile"})
    int16_points: tuple[str, ...] = field(default=(), metadata={"help": "activation tensors kept at 16 bits"})
    int16_weights: tuple[str, ...] = field(default=(), metadata={"help": "weights quantized at 16 bits (per channel)"})
    int16_budget: float = field(default=0.0, metadata={"help": "fraction of points at 16 bits (see int16_budget_over)"})
    int16_budget_over: Literal["activations", "points"] = field(default="activations", metadata={
        "help": "what int16_budget is a fraction of: 'activations' (activation points) or 'points' "
                "(activations and weights; 16-bit weights count against it)"})
    sensitivity: str = field(default="", metadata={"file": True, "help": "sensitivity JSON ranking the points (else SQNR proxy)"})
    smoothquant_alpha: float = field(default=0.0, metadata={"help": "SmoothQuant migration strength (0: off)"})
    smoothquant_weights: tuple[str, ...] = field(
        default=(), metadata={"help": "smooth only the inputs of linears whose weight matches (globs, 're:...'); "
                                      "empty: every input SmoothQuant can reach"})
    # off by default: ORT 1.32's CPU fusions (MatMulIntegerToFloat / QGemm without an output Q)
    # compute wrong results with a DQ'd int32 bias (max error 0.8 vs 0.02 unfused, see the tests);
    # QNN and the NPU simulator derive bias encodings from s_x·s_w themselves
    quantize_bias: bool = field(default=False, metadata={"help": "int32 biases of quantized linears"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "tensor names (weights or activations) left float"})

    def check(self) -> None:
        if self.weight_bits not in (4, 8, 16):
            raise OptionError(f"'quantize': option 'weight_bits' must be 4, 8 or 16, got {self.weight_bits}")
        if self.embedding_bits not in (0, 4, 8, 16):
            raise OptionError(f"'quantize': option 'embedding_bits' must be 0, 4, 8 or 16, got {self.embedding_bits}")
        if self.activation_bits not in (0, 8, 16):
            raise OptionError(f"'quantize': option 'activation_bits' must be 0, 8 or 16, got {self.activation_bits}")
        if self.weight_granularity == "block" and (self.weight_block_size < 2 or self.weight_block_size & (self.weight_block_size - 1)):
            raise OptionError(
                f"'quantize': option 'weight_block_size' must be a power of two >= 2, got {self.weight_block_size}")
        if not 0.0 <= self.int16_budget <= 1.0:
            raise OptionError(f"'quantize': option 'int16_budget' must be in [0, 1], got {self.int16_budget}")
        if not 0.0 <= self.smoothquant_alpha < 1.0:
            raise OptionError(f"'quantize': option 'smoothquant_alpha' must be in [0, 1), got {self.smoothquant_alpha}")
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(f"'quantize': option 'percentile' must be in (50, 100], got {self.percentile}")
        if self.sensitivity and not Path(self.sensitivity).is_file():
            raise OptionError(f"'quantize': option 'sensitivity': no such file '{self.sensitivity}'")

    # ---------------------------------------------------------------------------- entry
    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        opset = _graph_opset(graph)
        if opset and opset < MIN_OPSET:
            raise UnsupportedGraphError(
                f"'quantize': graph '{model.name}' has opset {opset}; QDQ with int4/16 and blocks needs "
                f">= {MIN_OPSET} (lower it again with graphopt.lower)")
        sites = [s for s in linear_sites(model) if s.weight not in self.exclude]
        if not sites:
            return PassResult(model, False, {"reason": "no float MatMul/Gemm/Conv weight to quantize"})
        tensors = graph.tensors()
        points = [] if not self.activation_bits else list(OrderedDict.fromkeys(
            s.activation for s in sites if s.activation not in self.exclude))
        unknown = [p for p in self.int16_points if p not in points]
        if unknown:
            raise OptionError(f"'quantize': option 'int16_points': '{unknown[0]}' is not an activation entering "
                              f"a quantized MatMul/Gemm/Conv of '{model.name}'")
        weights = {s.weight for s in sites}
        unknown = [w for w in self.int16_weights if w not in weights]
        if unknown:
            raise OptionError(f"'quantize': option 'int16_weights': '{unknown[0]}' is not the constant weight of a "
                              f"MatMul/Gemm/Conv of '{model.name}'")
        calib = ctx.require_calib(self.name) if points or self.weight_rounding == "gptq" or self.smoothquant_alpha else None
        stats: dict = {}
        plans = self._smooth_plans(model, sites, points) if self.smoothquant_alpha and points else {}
        if plans and self.observer == "minmax" and self.weight_rounding == "rtn":
            # one calibration run: per-channel statistics give the smoothed ranges exactly
            channels = capture(model, calib, points, lambda _: MinMaxObserver(axis=-1),
                                           progress=ctx.progress, desc="quantize: calibrating")
            migrated = self._migrate(model, plans, channels)
            observers = {p: channels[p].divided(migrated.get(p)) for p in points}
            hessians = {}
        elif plans and _recording_bytes(model, calib, plans) > RECORDING_LIMIT:
            channels = capture(model, calib, list(plans), lambda _: MinMaxObserver(axis=-1),
                                           progress=ctx.progress, desc="quantize: smoothing")
            self._migrate(model, plans, channels)
            observers, hessians = self._calibrate(model, sites, points, calib, ctx)
        else:
            observers, hessians = self._calibrate(model, sites, points, calib, ctx, plans)
        stats["smoothed"] = len(plans)
        # linear weights are 16-bit when named so or when every weight is (tables are not linear sites)
        wide_weights = len(weights) if self.weight_bits == 16 else len(weights & set(self.int16_weights))
        int16 = self._int16_points(points, observers, sites, len(weights), wide_weights)
        encodings = Encodings()
        for point in points:
            encodings.add(self._activation_encoding(point, observers[point], point in int16), "activation")
        codes = self._weight_encodings(model, sites, tensors, hessians, encodings, ctx)
        result = qdq.apply_encodings(graph, encodings, codes=codes, quantize_bias=self.quantize_bias)
        _check_masks(model, encodings, tensors)
        model.meta.encodings.update(encodings.to_meta())
        stats.update(weights=len(result.weights), activations=len(result.activations),
                     int16_points=len(int16), biases=len(result.biases),
                     int16_share=int16_share(len(int16), len(points), wide_weights, len(weights)),
                     int16=[p for p in points if p in int16][:64])
        if not stats["smoothed"]:
            del stats["smoothed"]
        return PassResult(model, True, stats)

    # ----------------------------------------------------------------- calibration
    def _calibrate(self, model, sites, points, calib, ctx, plans: dict | None = None):
        """Observers (and GPTQ Hessians) of `points` in one calibration run. With SmoothQuant
        `plans`, their points are recorded too, migrated after the run, and their recorded values
        divided by the factors feed the observers: no second run of the smoothed model."""
        hessians = {}
        plans = plans or {}
        if not points and self.weight_rounding != "gptq":
            return {}, hessians
        observers = {p: make_observer(self.observer, **({"percentile": self.percentile} if self.observer == "percentile" else {}))
                     for p in points}
        wanted = list(points)
        if self.weight_rounding == "gptq":
            hessians = {s.activation: InputHessian() for s in sites if s.op == "MatMul"}
            wanted += [a for a in hessians if a not in observers]

        channels = {p: MinMaxObserver(axis=-1) for p in plans}
        recorded: dict[str, list[np.ndarray]] = {p: [] for p in plans}

        def make(name):
            if name in plans:
                return _Tee(channels[name], _Recorder(recorded[name]))
            parts = [x for x in (observers.get(name), hessians.get(name)) if x is not None]
            return parts[0] if len(parts) == 1 else _Tee(*parts)

        capture(model, calib, wanted, make, progress=ctx.progress, desc="quantize: calibrating")
        factors = self._migrate(model, plans, channels) if plans else {}
        for point, batches in recorded.items():
            followers = [x for x in (observers.get(point), hessians.get(point)) if x is not None]
            for batch in batches:
                smoothed = batch / factors[point]
                for follower in followers:
                    follower.update(smoothed)
        return observers, hessians

    def _int16_points(self, points: list[str], observers: dict, sites: list, weights: int,
                      wide_weights: int) -> set[str]:
        chosen = [p for p in points if p in self.int16_points]
        budget = int16_budget_count(self.int16_budget, len(points), weights, wide_weights, self.int16_budget_over)
        if self.activation_bits == 16 or budget <= len(chosen):
            return set(points) if self.activation_bits == 16 else set(chosen)
        if self.sensitivity:
            # by the weights a point feeds when its tensor name is not in this graph (another
            # exporter version numbers activations differently; parameter names are stable)
            fed_by = {s.weight: s.activation for s in sites}
            ranked = [r["point"] if r["point"] in observers else fed_by.get((r.get("feeds") or [""])[0], r["point"])
                      for r in read_sensitivity(self.sensitivity, self.name) if r["kind"] == "activation"]
        else:  # proxy: the points whose 8-bit grid loses the most signal
            spec = QuantSpec(dtype_for(8, self.activation_symmetric), symmetric=self.activation_symmetric)
            ranked = sorted(points, key=lambda p: observers[p].sqnr_db(spec))
        for point in ranked:
            if len(chosen) >= budget:
                break
            if point in observers and point not in chosen:
                chosen.append(point)
        return set(chosen)

    def _activation_encoding(self, point: str, observer, wide: bool) -> Encoding:
        bits = 16 if wide else self.activation_bits
        spec = QuantSpec(dtype_for(bits, self.activation_symmetric), symmetric=self.activation_symmetric)
        scale, zero_point = observer.params(spec)
        return Encoding.from_params(point, scale, zero_point, spec)

    # ----------------------------------------------------------------------- weights
    def _weight_spec(self, name: str, shape, channel_axis: int, block_axis: int, table: bool) -> QuantSpec:
        if name in self.int16_weights:
            return QuantSpec(dtype_for(16, self.weight_symmetric), "channel", channel_axis, symmetric=self.weight_symmetric)
        if table and self.embedding_bits:
            return QuantSpec(dtype_for(self.embedding_bits, self.weight_symmetric), "channel", channel_axis,
                             symmetric=self.weight_symmetric)
        dtype = dtype_for(self.weight_bits, self.weight_symmetric)
        if self.weight_granularity == "tensor":
            return QuantSpec(dtype, "tensor", symmetric=self.weight_symmetric)
        if self.weight_granularity == "channel":
            return QuantSpec(dtype, "channel", channel_axis, symmetric=self.weight_symmetric)
        if shape[block_axis] % self.weight_block_size:
            raise UnsupportedGraphError(
                f"'quantize': weight '{name}' has {shape[block_axis]} input rows, not a multiple of "
                f"weight_block_size {self.weight_block_size}")
        return QuantSpec(dtype, "block", block_axis, self.weight_block_size, self.weight_symmetric)

    def _weight_encodings(self, model, sites, tensors, hessians, encodings: Encodings, ctx) -> dict:
        readers = consumers(model.graph)
        users = {n: readers[id(t)] for n, t in tensors.items() if isinstance(t, gs.Constant) and id(t) in readers}
        names = list(OrderedDict.fromkeys(s.weight for s in sites))
        tables = [n for n, readers in users.items() if any(r.op == "Gather" and r.inputs[0].name == n for r in readers)
                  and tensors[n].values.ndim == 2 and tensors[n].values.dtype == np.float32 and n not in self.exclude]
        names += [t for t in tables if t not in names]
        site_of = {s.weight: s for s in sites}
        specs = {}
        for name in names:
            channel_axis, block_axis = qdq.weight_axes(model.graph, tensors[name], users[name])
            specs[name] = self._weight_spec(name, tensors[name].values.shape, channel_axis, block_axis, name in tables)
        # GPTQ for linear weights (a table's rounding must serve its lookups too: RTN there)
        solved = [n for n in names if self.weight_rounding == "gptq" and n not in tables and n in site_of
                  and site_of[n].op == "MatMul" and site_of[n].activation in hessians]
        found = {}
        groups = _shared_input_groups(solved, site_of, specs)
        for group in progress_bar(groups, len(groups), "quantize: GPTQ", ctx.progress and bool(groups)):
            found.update(_gptq_group(group, tensors, specs[group[0]], hessians[site_of[group[0]].activation].hessian,
                                    model.meta.masks, self.weight_range))
        codes = {}
        for name in progress_bar(names, len(names), "quantize: weights", ctx.progress):
            spec = specs[name]
            if name in found:
                scale, zero_point = found[name].scale, found[name].zero_point
                codes[name] = np.asarray(found[name].codes).astype(np.int32).astype(spec.np_dtype)
            elif self.weight_range == "mse":
                scale, zero_point = numerics.mse_params(np.asarray(tensors[name].values, np.float32), spec)
            else:
                scale, zero_point = numerics.params_for(np.asarray(tensors[name].values, np.float32), spec)
            encodings.add(Encoding.from_params(name, scale, zero_point, spec), "param")
        return codes

    # ---------------------------------------------------------------- SmoothQuant
    def _smooth_plans(self, model, sites, points) -> dict:
        """point -> (fold, consumer sites) for the points SmoothQuant can migrate."""
        graph = model.graph
        by_activation: dict[str, list] = {}
        for s in sites:
            by_activation.setdefault(s.activation, []).append(s)
        tensors = graph.tensors()
        users = consumers(graph)
        plans = {}
        for point in points:
            if self.smoothquant_weights and not any(
                    name_matches(s.weight, self.smoothquant_weights) for s in by_activation.get(point, [])):
                continue
            plan = _smooth_plan(tensors[point], by_activation.get(point, []), users, tensors)
            if plan is not None:
                plans[point] = plan
        return plans

    def _migrate(self, model, plans: dict, channels: dict) -> dict[str, np.ndarray]:
        """Fold the migration factors of each planned point; returns them by point."""
        tensors = model.graph.tensors()
        factors = {}
        for point, (fold, linears) in plans.items():
            lo, hi = channels[point].range()
            act = np.maximum(np.abs(lo), np.abs(hi))
            wmax = np.max([np.abs(tensors[s.weight].values).max(axis=1) for s in linears], axis=0)
            s = numerics.smooth_scales(act, wmax, self.smoothquant_alpha)
            fold(s)
            for site in linears:
                w = tensors[site.weight]
                w.values = (np.asarray(w.values, np.float32) * s[:, None]).astype(np.float32)
            factors[point] = s
        return factors


def _shared_input_groups(names: list[str], site_of: dict, specs: dict) -> list[list[str]]:
    """Weights that read the same activation with the same per-channel/per-block spec (q/k/v,
    gate/up): GPTQ solves them as one wider weight, the Hessian factored once."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        spec = specs[name]
        key = (site_of[name].activation, spec) if spec.granularity != "tensor" else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _gptq_group(names: list[str], tensors, spec: QuantSpec, hessian, masks, grid: str) -> dict:
    """GPTQ of [in, out] weights side by side (output channels are independent), split back."""
    values = [np.asarray(tensors[n].values, np.float32) for n in names]
    mask = None
    if any(n in masks for n in names):
        mask = np.concatenate([(v != 0) if n in masks else np.ones(v.shape, bool) for n, v in zip(names, values)], axis=1)
    joint = gptq_quantize(np.concatenate(values, axis=1), hessian, spec, mask=mask, grid=grid)
    out, start = {}, 0
    for name, value in zip(names, values):
        part = slice(start, start + value.shape[1])
        start = part.stop
        out[name] = GPTQResult(joint.dequantized[:, part], joint.codes[:, part],
                               joint.scale[..., part], joint.zero_point[..., part])
    return out


def _only_reader(tensor, node, users) -> bool:
    return [id(n) for n in users.get(id(tensor), [])] == [id(node)]


def _smooth_plan(point: gs.Tensor, consumers: list, users, tensors):
    """(fold(s), consumer sites) when dividing `point` by s can be folded upstream, else None."""
    readers = users.get(id(point), [])
    if not consumers or len(readers) != len(consumers) or any(s.op != "MatMul" for s in consumers):
        return None
    if any(len(users.get(id(tensors[s.weight]), [])) != 1 for s in consumers) or not point.inputs:
        return None
    producer = point.inputs[0]
    width = tensors[consumers[0].weight].values.shape[0]
    if producer.op == "Mul":
        for i, operand in enumerate(producer.inputs):
            if (isinstance(operand, gs.Constant) and operand.values.shape == (width,)
                    and _only_reader(operand, producer, users)):
                def fold(s, c=operand):
                    c.values = (np.asarray(c.values, np.float32) / s).astype(np.float32)
                return fold, consumers
        for operand in producer.inputs:
            linear = operand.inputs[0] if isinstance(operand, gs.Variable) and operand.inputs else None
            if linear is not None and _foldable_linear(linear, operand, producer, users, width):
                return _column_fold(linear.inputs[1]), consumers
    if producer.op == "MatMul" and all(_only_reader(t, producer, users) for t in producer.inputs[1:2]):
        if isinstance(producer.inputs[1], gs.Constant) and producer.inputs[1].values.shape[-1] == width:
            return _column_fold(producer.inputs[1]), consumers
    return None


def _foldable_linear(linear: gs.Node, output, reader, users, width) -> bool:
    weight = linear.inputs[1] if len(linear.inputs) > 1 else None
    return (linear.op == "MatMul" and isinstance(weight, gs.Constant) and weight.values.ndim == 2
            and weight.values.shape[1] == width and _only_reader(output, reader, users)
            and _only_reader(weight, linear, users))


def _column_fold(weight: gs.Constant):
    def fold(s):
        weight.values = (np.asarray(weight.values, np.float32) / s[None, :]).astype(np.float32)
    return fold


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
