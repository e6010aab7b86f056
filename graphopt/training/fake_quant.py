"""Fake quantization on the FX form: trainable quantizer modules, their insertion and calibration,
and the export of what they learned as encodings.

The `fake_quantize` pass calls `insert_fake_quant`, `observe` and `set_ranges` (choosing the 16-bit
activation points in between, `graphopt.quant.plan`); `graphopt.training.distillation`
fine-tunes weights and quantizer scales; `export_encodings` writes the learned scales as AIMET/QNN
encodings keyed by the ONNX tensor names of the lowered model, which `fold_encodings` turns into
a static QDQ model.

Quantization points mirror the ONNX quantize pass: the weight of every `aten.linear` (a tied
embedding table is one point, quantized for both its uses) and the activation entering it (one
quantizer per distinct tensor, shared by q/k/v or gate/up). Activation names survive lowering
only through the weights they feed, so every activation quantizer records those weights and
`export_encodings` finds the ONNX tensor through `graphopt.analysis.linear_sites`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import torch

from graphopt.analysis.capture import InputHessian, progress_bar
from graphopt.analysis.linear_sites import linear_sites
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir import Model
from graphopt.ir.fx_graph import get_weight, set_parameter
from graphopt.quant import numerics
from graphopt.quant.encodings import Encoding, Encodings
from graphopt.quant.observers import make_observer
from graphopt.quant.plan import weight_matches
from graphopt.quant.spec import QuantSpec

__all__ = [
    "FakeQuant", "activation_points", "insert_fake_quant", "observe", "set_ranges", "gptq_round_weights", "fake_quant_modules",
    "table_weights", "set_fake_quant", "strip_fake_quant", "export_encodings", "quantizer_nodes",
]

MODULE_PREFIX = "graphopt_fq_"


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class FakeQuant(torch.nn.Module):
    """Quantize-dequantize with a learnable step size (LSQ, Esser et al. 2019).

    The step is held as log(scale) so optimiser steps are relative and the scale stays positive;
    rounding passes gradients straight through, clipping stops them outside the grid, and the
    scale gets LSQ's gradient (rounding residual inside the grid, ±qmax/qmin outside).
    `spec` uses torch layout: a weight [out, in] has its channel axis 0. The zero point is fixed
    at calibration (asymmetric activations); the formulas are `graphopt.quant.numerics`'.

    kind: "weight" or "activation"; name: the parameter name (weights) or, for activations,
    the first weight fed; feeds: every weight this activation enters.
    """

    def __init__(self, spec: QuantSpec, kind: str, name: str, feeds: tuple[str, ...] = (), channels: int = 1):
        super().__init__()
        if spec.granularity not in ("tensor", "channel"):
            raise OptionError(f"fake_quantize: granularity '{spec.granularity}' is not supported (tensor, channel)")
        self.spec, self.kind, self.name, self.feeds = spec, kind, name, tuple(feeds)
        shape = (channels,) if spec.granularity == "channel" else ()
        self.log_scale = torch.nn.Parameter(torch.zeros(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("lo", torch.full(shape, math.inf))
        self.register_buffer("hi", torch.full(shape, -math.inf))
        self.observing = False
        self.enabled = True
        self.fused = False  # torch's fused LSQ kernels (see `fused_forward`)
        self.observer = None  # a graphopt.quant.observers observer fed while observing (None: min/max only)
        self.hessian = None  # an activations.InputHessian fed while observing (GPTQ weight rounding)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            return t
        shape = [1] * x.ndim
        shape[self.spec.axis] = -1
        return t.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                lo, hi = self._range(x)
                self.lo.copy_(torch.minimum(self.lo, lo))
                self.hi.copy_(torch.maximum(self.hi, hi))
                if self.observer is not None or self.hessian is not None:
                    values = x.detach().float().cpu().numpy()
                    for sink in (self.observer, self.hessian):
                        if sink is not None:
                            sink.update(values)
            return x
        if not self.enabled:
            return x
        if self.fused and self.spec.qmax - self.spec.qmin <= 255:
            # 8 bits and fewer only: at 16 bits the kernel adds the zero point (up to 65535) before
            # rounding in float32, which leaves the scale's gradient ~7 % off
            return self.fused_forward(x)
        scale = self._view(self.log_scale.exp(), x)
        zero_point = self._view(self.zero_point, x)
        q = torch.clamp(_round_ste(x / scale) + zero_point, self.spec.qmin, self.spec.qmax)
        return (q - zero_point) * scale

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantizer and LSQ gradients in one torch kernel each way (instead of ~8 small ones:
        QAT on a GPU is launch-bound). The kernel multiplies by 1/scale where ONNX QuantizeLinear
        divides, so a value on a rounding boundary may land one step away (training only; the
        exported encodings are the same parameters)."""
        scale, zero_point, spec = self.log_scale.exp(), self.zero_point, self.spec
        if spec.granularity == "tensor":
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale.reshape(1), zero_point.reshape(1), spec.qmin, spec.qmax, 1.0)
        return torch._fake_quantize_learnable_per_channel_affine(
            x, scale, zero_point, spec.axis, spec.qmin, spec.qmax, 1.0)

    def _range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.granularity == "tensor":
            return x.min(), x.max()
        flat = x.detach().movedim(self.spec.axis, 0).reshape(x.shape[self.spec.axis], -1)
        return flat.min(1).values, flat.max(1).values

    def init_from_range(self) -> None:
        """Scale and zero point from what was observed: the attached observer's range, else min/max
        (numerics.scale_zero_point)."""
        if not torch.isfinite(self.lo).all():
            raise UnsupportedGraphError(f"fake quantizer of '{self.name}' saw no data during calibration")
        if self.observer is not None:
            scale, zero_point = self.observer.params(self.spec)
        else:
            scale, zero_point = numerics.scale_zero_point(self.lo.cpu().numpy(), self.hi.cpu().numpy(), self.spec)
        self.set_params(scale, zero_point)

    def set_params(self, scale: np.ndarray, zero_point: np.ndarray) -> None:
        """Take a scale and zero point in this module's layout (the inverse of `params`)."""
        with torch.no_grad():
            self.log_scale.copy_(torch.from_numpy(np.asarray(np.log(scale), dtype=np.float32)).reshape(self.log_scale.shape))
            self.zero_point.copy_(torch.from_numpy(np.asarray(zero_point, dtype=np.float32)).reshape(self.zero_point.shape))

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        """ONNX-style (scale float32, zero point int64) in this module's layout."""
        return (self.log_scale.detach().exp().cpu().numpy().astype(np.float32),
                self.zero_point.detach().cpu().numpy().astype(np.int64))

    def extra_repr(self) -> str:
        return f"{self.kind} '{self.name}', {self.spec.dtype} per {self.spec.granularity}"


# ------------------------------------------------------------------------------- insertion
def _linear_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]


def quantizer_nodes(gm) -> list:
    """The graph's calls of inserted quantizers, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(MODULE_PREFIX)]


def fake_quant_modules(model: Model) -> dict[str, FakeQuant]:
    """The fake quantizers in an FX model, by submodule name."""
    model.require("fx", "fake_quant_modules")
    return {name: m for name, m in model.fx.named_children() if isinstance(m, FakeQuant)}


def _quantized_linears(gm, exclude: tuple[str, ...]) -> tuple[list, dict[Any, list[str]]]:
    """Linears with a parameter weight that `exclude` (names, globs, 're:...') does not match, and
    each input activation's weights."""
    linears = [n for n in _linear_nodes(gm) if n.args[1].op == "get_attr" and not weight_matches(n.args[1].target, exclude)]
    feeds: dict[Any, list[str]] = {}
    for node in linears:
        feeds.setdefault(node.args[0], []).append(node.args[1].target)
    return linears, feeds


def activation_points(model: Model, exclude: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The activation quantization points `insert_fake_quant` would make, each as the weights it feeds."""
    model.require("fx", "activation_points")
    return [tuple(f) for f in _quantized_linears(model.fx, exclude)[1].values()]


def insert_fake_quant(model: Model, weight_spec: Callable[[str], QuantSpec] | None, activation_spec: QuantSpec | None,
                      exclude: tuple[str, ...] = ()) -> list[FakeQuant]:
    """Insert quantizers into `model.fx` in place; returns them (empty when there is nothing to do).

    weight_spec: the spec of a weight by its parameter name, torch layout (channel axis 0 of
    [out, in]); None leaves weights float. activation_spec: per tensor; None leaves activations
    float (a quantizer's spec may be changed before `set_ranges`, e.g. to 16 bits). `exclude`
    matches weights (names, globs, 're:...') whose weight and input activation stay float.
    """
    model.require("fx", "insert_fake_quant")
    gm = model.fx
    if fake_quant_modules(model):
        return []
    graph = gm.graph
    inserted: list[FakeQuant] = []
    weight_q: dict[Any, Any] = {}
    act_q: dict[Any, Any] = {}
    linears, feeds = _quantized_linears(gm, exclude)
    pairs = [(node.args[0], node.args[1]) for node in linears]  # read before rewiring changes args
    for x, w in pairs:
        if weight_spec is not None and w not in weight_q:
            param = get_weight(gm, w.target)  # tied tables are deduplicated in named_parameters
            module = FakeQuant(weight_spec(w.target), "weight", w.target, channels=param.shape[0])
            weight_q[w] = _add(gm, module, w, inserted, users=None)
        if activation_spec is not None and x not in act_q:
            module = FakeQuant(activation_spec, "activation", feeds[x][0], tuple(feeds[x]))
            act_q[x] = _add(gm, module, x, inserted, users=[n for n, (a, _) in zip(linears, pairs) if a is x])
    graph.lint()
    gm.recompile()
    return inserted


def _add(gm, module: FakeQuant, source, inserted: list, users) -> Any:
    """Call `module` on `source`; rewire `users` (None: every user) to its output."""
    name = f"{MODULE_PREFIX}{len(inserted)}"
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(source):
        new = gm.graph.call_module(name, (source,))
    if users is None:
        source.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    else:
        for user in users:
            user.replace_input_with(source, new)
    inserted.append(module)
    return new


def observe(model: Model, feeds: list[dict[str, np.ndarray]] | None, *, observer: str = "minmax",
            percentile: float = 99.99, hessians: bool = False, progress: bool = True) -> None:
    """Run `feeds` (default: the model's sample inputs, enough for weights alone) through the model
    with every quantizer observing its input: weights their min/max, activations an `observer`
    ("minmax", "percentile" or "mse", as the quantize pass's; its `sqnr_db` is the 16-bit proxy)
    and, with `hessians`, their input's Hessian (`FakeQuant.hessian`, for `gptq_round_weights`).
    `set_ranges` then turns what was seen into scales."""
    modules = list(fake_quant_modules(model).values())
    options = {"percentile": percentile} if observer == "percentile" else {}
    for module in modules:
        module.observing = True
        if module.kind == "activation":
            module.observer = make_observer(observer, **options)
            module.hessian = InputHessian() if hessians else None
    feeds = feeds or model.sample_inputs
    if not feeds:
        raise OptionError(f"calibrating the fake quantizers of '{model.name}' needs at least one feed")
    try:
        for batch in progress_bar(feeds, len(feeds), "fake_quantize: ranges", progress):
            model.run(batch)
    finally:
        for module in modules:
            module.observing = False


def set_ranges(model: Model, *, weight_range: str = "minmax") -> None:
    """Scales and zero points from what `observe` saw, for each quantizer's current spec:
    activations from their observer's range, weights from min/max or, with `weight_range` "mse",
    the MSE-clipped ranges of `numerics.mse_params` (as the quantize pass's). Observers are freed."""
    gm = model.fx
    for module in fake_quant_modules(model).values():
        module.init_from_range()
        module.observer = None
        if module.kind == "weight" and weight_range == "mse":
            weight = get_weight(gm, module.name).detach().cpu().numpy()
            module.set_params(*numerics.mse_params(weight, module.spec))


def table_weights(model: Model) -> set[str]:
    """Parameter names read by an embedding lookup (directly or through their quantizer)."""
    model.require("fx", "table_weights")
    gm = model.fx
    names = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
            source = node.args[0]
            if source.op == "call_module" and source.target.startswith(MODULE_PREFIX):
                source = source.args[0]
            if source.op == "get_attr":
                names.add(source.target)
    return names


def gptq_round_weights(model: Model, *, grid: str = "minmax", progress: bool = True) -> int:
    """Replace every linear weight by its GPTQ rounding (graphopt.quant.gptq) on its quantizer's
    grid, and set the quantizer to that grid; returns how many weights were rounded.

    Needs the input Hessians `observe(..., hessians=True)` kept. The quantized model then
    computes what the ONNX quantize pass's GPTQ weights compute, and training starts from there
    instead of round-to-nearest. Embedding tables keep round-to-nearest (their rounding serves the
    lookups as much as the lm_head), as in the quantize pass; the Hessians are freed."""
    from graphopt.quant.gptq import gptq_quantize

    gm = model.fx
    modules = list(fake_quant_modules(model).values())
    hessians = {w: m.hessian for m in modules if m.kind == "activation" and m.hessian is not None for w in m.feeds}
    if not hessians:
        raise UnsupportedGraphError(f"'{model.name}': no input Hessians; calibrate with hessians=True first")
    tables = table_weights(model)
    weights = [m for m in modules if m.kind == "weight" and m.name in hessians and m.name not in tables]
    for module in progress_bar(weights, len(weights), "fake_quantize: GPTQ", progress):
        spec = module.spec if module.spec.granularity == "tensor" else dataclasses.replace(module.spec, axis=1)
        weight = get_weight(gm, module.name).detach().cpu().numpy().T
        result = gptq_quantize(weight, hessians[module.name].hessian, spec, grid=grid)
        set_parameter(gm, module.name, result.dequantized.T)
        module.set_params(result.scale, result.zero_point)
    for module in modules:
        module.hessian = None
    return len(weights)


def set_fake_quant(model: Model, enabled: bool) -> None:
    """Switch every quantizer on or off (off: the float model, for a teacher or a check)."""
    for module in fake_quant_modules(model).values():
        module.enabled = enabled


def strip_fake_quant(model: Model) -> Model:
    """A float FX model with the (trained) weights and no quantizers, ready for lowering."""
    out = model.copy()
    gm = out.fx
    for node in quantizer_nodes(gm):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        delattr(gm, node.target)
    gm.graph.lint()
    gm.recompile()
    return out


# ---------------------------------------------------------------------------------- export
def _onnx_spec(module: FakeQuant, onnx_axis: int | None) -> QuantSpec:
    spec = module.spec
    if spec.granularity == "channel":
        return QuantSpec(spec.dtype, "channel", axis=onnx_axis, symmetric=spec.symmetric)
    return QuantSpec(spec.dtype, spec.granularity, symmetric=spec.symmetric)


def export_encodings(model: Model, lowered: Model) -> Encodings:
    """The learned scales as AIMET/QNN encodings named by `lowered`'s ONNX tensors.

    Weights keep their parameter names through lowering (a tied table is stored transposed as
    `NAME.T`); an [out, in] channel axis becomes the ONNX [in, out] weight's output axis. An
    activation is the input tensor of the ONNX linear site of a weight it feeds. A quantizer whose
    tensor cannot be found raises UnsupportedGraphError naming it.
    """
    model.require("fx", "export_encodings")
    lowered.require("onnx", "export_encodings")
    sites = {s.weight: s for s in linear_sites(lowered)}
    encodings = Encodings()
    for module in fake_quant_modules(model).values():
        site = next((sites[n] for w in (module.feeds or (module.name,)) for n in (w, f"{w}.T") if n in sites), None)
        if site is None:
            raise UnsupportedGraphError(
                f"export_encodings: no ONNX linear layer in '{lowered.name}' reads weight '{module.name}' "
                f"(looked for '{module.name}' and '{module.name}.T')")
        scale, zero_point = module.params()
        if module.kind == "weight":
            spec = _onnx_spec(module, site.out_axis)
            encodings.add(Encoding.from_params(site.weight, scale, zero_point, spec), "param")
        else:
            spec = _onnx_spec(module, None)
            encodings.add(Encoding.from_params(site.activation, scale.reshape(()), zero_point.reshape(()), spec),
                          "activation")
    return encodings
