"""Quantization-aware training on the FX form: fake-quant modules, a distillation loop, encodings export.

The `fake_quantize` pass (passes/fake_quantize.py) calls `insert_fake_quant` and `calibrate`;
`train` fine-tunes weights and quantizer scales against the float model's logits (temperature
KD or BiLD); `export_encodings` writes the learned scales as AIMET/QNN encodings keyed by the
ONNX tensor names of the lowered model, which `fold_encodings` turns into a static QDQ model.

Quantization points mirror the ONNX quantize pass: the weight of every `aten.linear` (a tied
embedding table is one point, quantized for both its uses) and the activation entering it (one
quantizer per distinct tensor, shared by q/k/v or gate/up). Activation names survive lowering
only through the weights they feed, so every activation quantizer records those weights and
`export_encodings` finds the ONNX tensor through `activations.linear_sites`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from graphopt import activations
from graphopt.encodings import Encoding, Encodings
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir import Model
from graphopt.quant import numerics
from graphopt.quant.observers import make_observer
from graphopt.quant.spec import QuantSpec, dtype_for

__all__ = [
    "FakeQuant", "activation_points", "insert_fake_quant", "calibrate", "gptq_round_weights", "fake_quant_modules",
    "table_weights",
    "set_fake_quant",
    "kd_loss", "reverse_kd_loss", "bild_loss", "feature_loss", "train", "TrainReport", "generate_windows",
    "strip_fake_quant",
    "export_encodings",
]

MODULE_PREFIX = "graphopt_fq_"
Loss = Literal["kd", "rkl", "bild"]
DEFAULT_TEMPERATURE = {"kd": 2.0, "rkl": 1.0, "bild": 3.0}


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


def _quantizer_nodes(gm) -> list:
    """The graph's calls of inserted quantizers, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(MODULE_PREFIX)]


def fake_quant_modules(model: Model) -> dict[str, FakeQuant]:
    """The fake quantizers in an FX model, by submodule name."""
    model.require("fx", "fake_quant_modules")
    return {name: m for name, m in model.fx.named_children() if isinstance(m, FakeQuant)}


def _quantized_linears(gm, skip: tuple[str, ...]) -> tuple[list, dict[Any, list[str]]]:
    """Linears with a parameter weight not in `skip`, and each input activation's weights."""
    linears = [n for n in _linear_nodes(gm) if n.args[1].op == "get_attr" and n.args[1].target not in skip]
    feeds: dict[Any, list[str]] = {}
    for node in linears:
        feeds.setdefault(node.args[0], []).append(node.args[1].target)
    return linears, feeds


def activation_points(model: Model, skip: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The activation quantization points `insert_fake_quant` would make, each as the weights it feeds."""
    model.require("fx", "activation_points")
    return [tuple(f) for f in _quantized_linears(model.fx, skip)[1].values()]


def insert_fake_quant(model: Model, weight_spec: QuantSpec | None, activation_spec: QuantSpec | None,
                      skip: tuple[str, ...] = (), wide: frozenset[str] = frozenset(),
                      wide_spec: QuantSpec | None = None, wide_weights: frozenset[str] = frozenset()) -> list[FakeQuant]:
    """Insert quantizers into `model.fx` in place; returns them (empty when there is nothing to do).

    weight_spec: torch layout (channel axis 0 of [out, in]); None leaves weights float.
    activation_spec: per tensor; None leaves activations float. `skip` names weights (their
    parameter names) whose weight and input activation stay float. An activation feeding a
    weight named in `wide` gets `wide_spec` instead (16-bit sensitive points); weights named in
    `wide_weights` get 16 bits in weight_spec's layout.
    """
    model.require("fx", "insert_fake_quant")
    gm = model.fx
    if fake_quant_modules(model):
        return []
    graph = gm.graph
    inserted: list[FakeQuant] = []
    weight_q: dict[Any, Any] = {}
    act_q: dict[Any, Any] = {}
    linears, feeds = _quantized_linears(gm, skip)
    pairs = [(node.args[0], node.args[1]) for node in linears]  # read before rewiring changes args
    for x, w in pairs:
        if weight_spec is not None and w not in weight_q:
            param = functools.reduce(getattr, w.target.split("."), gm)  # tied tables are deduplicated in named_parameters
            spec = weight_spec if w.target not in wide_weights else \
                dataclasses.replace(weight_spec, dtype=dtype_for(16, weight_spec.symmetric))
            module = FakeQuant(spec, "weight", w.target, channels=param.shape[0])
            weight_q[w] = _add(gm, module, w, inserted, users=None)
        if activation_spec is not None and x not in act_q:
            spec = wide_spec if wide_spec is not None and wide.intersection(feeds[x]) else activation_spec
            module = FakeQuant(spec, "activation", feeds[x][0], tuple(feeds[x]))
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


def calibrate(model: Model, feeds: list[dict[str, np.ndarray]] | None, *, progress: bool = True,
              observer: str = "minmax", hessians: bool = False) -> None:
    """Observe every quantizer's input over `feeds` (default: the model's sample inputs, enough
    for weights alone), then set scales and zero points: weights from min/max, activations from
    `observer` ("minmax", "percentile" or "mse", as the quantize pass's). `hessians`: activation
    quantizers also keep their input's Hessian (`FakeQuant.hessian`), for `gptq_round_weights`."""
    modules = list(fake_quant_modules(model).values())
    for module in modules:
        module.observing = True
        if module.kind == "activation" and observer != "minmax":
            module.observer = make_observer(observer)
        if module.kind == "activation" and hessians:
            module.hessian = activations.InputHessian()
    feeds = feeds or model.sample_inputs
    if not feeds:
        raise OptionError(f"calibrating the fake quantizers of '{model.name}' needs at least one feed")
    try:
        for batch in activations.progress_bar(feeds, len(feeds), "fake_quantize: ranges", progress):
            model.run(batch)
    finally:
        for module in modules:
            module.observing = False
    for module in modules:
        module.init_from_range()
        module.observer = None


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

    Needs the input Hessians `calibrate(..., hessians=True)` kept. The quantized model then
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
    for module in activations.progress_bar(weights, len(weights), "fake_quantize: GPTQ", progress):
        param = functools.reduce(getattr, module.name.split("."), gm)
        spec = module.spec if module.spec.granularity == "tensor" else dataclasses.replace(module.spec, axis=1)
        result = gptq_quantize(param.detach().cpu().numpy().T, hessians[module.name].hessian, spec, grid=grid)
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(result.dequantized.T)))
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
    for node in _quantizer_nodes(gm):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        delattr(gm, node.target)
    gm.graph.lint()
    gm.recompile()
    return out


# ---------------------------------------------------------------------------------- losses
def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton's KD: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over positions."""
    log_p_s, log_p_t = _log_probs(student, teacher, temperature)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2


def reverse_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL, T² · KL(softmax(student/T) ‖ softmax(teacher/T)), mean over positions.

    Mode-seeking where `kd_loss` is mass-covering (MiniLLM, Gu et al., arXiv 2306.08543): a student
    that cannot match the whole distribution keeps the teacher's peaks rather than spreading its
    mass over the teacher's tail, which is what top-1 agreement asks of it."""
    log_p_s, log_p_t = _log_probs(student, teacher, temperature)
    return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1).mean() * temperature**2


def _log_probs(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' log-softmax at temperature T, one row per position (the teacher in float32)."""
    vocab = student.shape[-1]
    return (F.log_softmax(student.reshape(-1, vocab) / temperature, dim=-1),
            F.log_softmax(teacher.reshape(-1, vocab).float() / temperature, dim=-1))


def _logit_differences(logits: torch.Tensor, k: int) -> torch.Tensor:
    i, j = torch.triu_indices(k, k, offset=1, device=logits.device)
    return logits[..., i] - logits[..., j]


def _led_loss(lead: torch.Tensor, follow: torch.Tensor, k: int, temperature: float, teacher_leads: bool) -> torch.Tensor:
    """One direction of BiLD: top-k of `lead`, the same indices of `follow`, pairwise differences."""
    picked, index = torch.topk(lead, k, dim=-1)
    other = torch.gather(follow, -1, index)
    student, teacher = (other, picked) if teacher_leads else (picked, other)
    diff_s = _logit_differences(student / temperature, k)
    diff_t = _logit_differences(teacher.detach() / temperature, k)
    return F.kl_div(F.log_softmax(diff_s, -1), F.log_softmax(diff_t, -1), log_target=True,
                    reduction="none").sum(-1).mean()


def bild_loss(student: torch.Tensor, teacher: torch.Tensor, top_k: int = 8, temperature: float = 3.0) -> torch.Tensor:
    """BiLD (Li, Zhou, Song, arXiv 2406.13555): bi-directional logits-difference loss.

    For the teacher's top-k logits (t-LD) and for the student's top-k (s-LD), take the logits of
    both models at those k indices, divide by T, form all k(k−1)/2 pairwise differences
    z[i] − z[j] (i < j in top-k order), and take KL(softmax(teacher diffs) ‖ softmax(student
    diffs)) summed over pairs; the loss is t-LD + s-LD, averaged over positions. Only the top-k
    of each model enters, so the long tail of the vocabulary adds no noise.
    """
    teacher = teacher.float()
    return (_led_loss(teacher, student, top_k, temperature, teacher_leads=True)
            + _led_loss(student, teacher, top_k, temperature, teacher_leads=False))


# ---------------------------------------------------------------------------------- training
@dataclass
class TrainReport:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    loss: str = "kd"
    device: str = "cpu"
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, overlap@1 with the teacher)
    best_step: int | None = None  # the step whose weights and scales the student kept

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def train(
    student: Model,
    teacher: Model | Callable[[torch.Tensor], torch.Tensor],
    windows: list[np.ndarray],
    *,
    steps: int = 100,
    lr: float = 1e-5,
    scale_lr: float = 1e-3,
    weight_scale_lr: float | None = None,
    loss: Loss = "kd",
    temperature: float | None = None,
    top_k: int = 8,
    clip: float = 1.0,
    warmup: int = 0,
    weight_decay: float = 0.0,
    train_weights: bool = True,
    batch_size: int = 1,
    device: str = "cpu",
    fused: bool = False,
    compile: bool = False,
    shuffle: int | None = None,
    cache_teacher: bool = True,
    validation: list[np.ndarray] | None = None,
    validate_every: int = 0,
    feature_weight: float = 0.0,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> TrainReport:
    """Fine-tune `student` (FX, with quantizers) to match `teacher`'s logits on token `windows`.

    AdamW (weights at `lr`, log-scales at `scale_lr`, the weight quantizers' at `weight_scale_lr`
    when given: 0 keeps the grids a GPTQ start rounded its weights to, which a moving scale would
    round again; no decay by default), linear warm-up then
    cosine decay to 0, gradient-norm clipping at `clip`. Each step takes the next `batch_size`
    windows, cycling in order (`shuffle`: a seed, each epoch in its own random order); teacher
    logits are computed once per window and kept (fp16) for later epochs, or computed at every step
    with `cache_teacher` False (12.6 MB a SmolLM2 window: thousands of generated windows would not
    fit in a GPU's memory). loss "kd" uses temperature 2 by default, "rkl" (`reverse_kd_loss`) 1, "bild"
    temperature 3 and `top_k` 8 (the paper's settings). `validation` windows (held out from
    `windows`): before training, every `validate_every` steps (default: a tenth of them) and at the
    end, the student's top-1 agreement with the teacher there is measured, and the student ends with
    the weights and scales of the best measurement (longer training can drift away from the teacher
    on text it did not see; `TrainReport.validation`, `best_step`). Top-1 agreement is noisy: on
    SmolLM2, 16 windows of 128 tokens varied by ±0.006 between steps that evaluate alike, so hold
    out many windows to rank steps, or few to catch a collapse. `fused` trains with torch's fused fake-quant kernels
    (`FakeQuant.fused_forward`, 8-bit quantizers; a KD step of SmolLM2 W8A8, rotated, 15 % of points
    at 16 bits, 2 x 128 tokens, on two CPU cores: 3.5 s instead of 8.2 s). On CUDA they are
    3-5x slower than the reference formula (H200, batch 8 x 128): leave `fused` off there.
    `compile` runs the training forward and backward through torch.compile (a GPU step is
    otherwise bound by the launches of thousands of small kernels; the first step compiles).
    `feature_weight` adds that many times `feature_loss` between what each of the student's
    linears reads (its activation quantizers' outputs) and the float values the teacher has at the
    same nodes (a teacher Model whose graph the student was copied from; computed at every step):
    every layer, not only the logits, is pulled back toward the float model.
    The student is trained in place (on `device`, moved back to CPU at the end).
    """
    student.require("fx", "qat.train")
    if loss not in DEFAULT_TEMPERATURE:
        raise OptionError(f"qat.train: loss must be one of {', '.join(DEFAULT_TEMPERATURE)}, got '{loss}'")
    if steps < 1 or not windows or batch_size < 1:
        raise OptionError("qat.train needs steps >= 1, batch_size >= 1 and at least one window")
    if feature_weight < 0 or (feature_weight and not isinstance(teacher, Model)):
        raise OptionError("qat.train: feature_weight must be >= 0 and needs the teacher as a Model (its graph's nodes)")
    quantizers = list(fake_quant_modules(student).values())
    if not quantizers:
        raise UnsupportedGraphError(f"'{student.name}' has no fake quantizers: run the fake_quantize pass first")
    temperature = temperature or DEFAULT_TEMPERATURE[loss]
    for module in quantizers:
        module.fused = fused
    gm = _to_device(student.fx, device)
    weight_scale_lr = scale_lr if weight_scale_lr is None else weight_scale_lr
    weight_scales = [m.log_scale for m in quantizers if m.kind == "weight"]
    for p in weight_scales:
        p.requires_grad_(bool(weight_scale_lr))
    weights = [p for n, p in gm.named_parameters() if not n.endswith("log_scale")]
    for p in weights:
        p.requires_grad_(train_weights)
    groups = [{"params": [m.log_scale for m in quantizers if m.kind == "activation"], "lr": scale_lr,
               "weight_decay": 0.0}]
    if weight_scale_lr:
        groups.append({"params": weight_scales, "lr": weight_scale_lr, "weight_decay": 0.0})
    if train_weights:
        groups.append({"params": weights, "lr": lr, "weight_decay": weight_decay})
    optimizer = torch.optim.AdamW(groups)
    bases = [g["lr"] for g in optimizer.param_groups]
    teacher_fn = _teacher_fn(teacher, device)
    cache: dict[int, torch.Tensor] = {}
    report = TrainReport(steps, 0.0, loss=loss, device=device)
    validator = _Validator(teacher_fn, validation, device) if validation else None
    every = validate_every or max(1, steps // 10)
    if validator:
        validator.measure(gm, 0, report)
    start = time.perf_counter()
    bar = activations.progress_bar(range(steps), steps, f"qat ({loss})", progress)
    order = _WindowOrder(len(windows), shuffle)
    trained = gm
    if feature_weight:
        # both graphs also return the values at the activation points: quantized in the student,
        # float in the teacher (the quantizer's input node, which the teacher's graph has too)
        points = [n for n in _quantizer_nodes(gm) if gm.get_submodule(n.target).kind == "activation"]
        teacher_fn = _with_outputs(teacher.fx, [n.args[0].name for n in points], teacher.name)
        trained = _with_outputs(gm, [n.name for n in points], student.name)
    forward = torch.compile(trained) if compile else trained
    for step in bar:
        indices = [order[step * batch_size + k] for k in range(batch_size)]
        ids = torch.cat([_window(windows[i], device) for i in indices])
        if feature_weight:
            with torch.no_grad():
                target, *teacher_points = teacher_fn(ids)
            target = target.float()
        elif cache_teacher:
            for index in indices:
                if index not in cache:
                    with torch.no_grad():
                        cache[index] = teacher_fn(_window(windows[index], device)).to(torch.float16)
            target = torch.cat([cache[i] for i in indices]).float()
        else:
            with torch.no_grad():
                target = teacher_fn(ids).float()
        factor = _lr_factor(step, steps, warmup)
        for group, base in zip(optimizer.param_groups, bases):
            group["lr"] = base * factor
        logits, *student_points = _outputs(forward, ids)
        if loss == "bild":
            value = bild_loss(logits, target, top_k, temperature)
        else:
            value = (kd_loss if loss == "kd" else reverse_kd_loss)(logits, target, temperature)
        if feature_weight:
            value = value + feature_weight * feature_loss(student_points, teacher_points)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], clip)
        optimizer.step()
        report.losses.append(float(value.detach()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{report.losses[-1]:.4f}")
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"qat: step {step + 1}/{steps} loss {sum(report.losses[-10:]) / len(report.losses[-10:]):.4f}")
        if validator and ((step + 1) % every == 0 or step + 1 == steps):
            validator.measure(gm, step + 1, report)
            log(f"qat: step {step + 1} validation overlap@1 {report.validation[-1][1]:.4f}")
    if validator:
        validator.restore(gm, report)
        log(f"qat: kept step {report.best_step} (validation overlap@1 {max(v for _, v in report.validation):.4f})")
    report.seconds = time.perf_counter() - start
    for module in quantizers:
        module.fused = False
        module.log_scale.requires_grad_(True)
    for p in weights:
        p.requires_grad_(False)
    student.fx = _to_device(gm, "cpu")
    if isinstance(teacher, Model):
        teacher.fx = _to_device(teacher.fx, "cpu")
    return report


def generate_windows(teacher: Model | Callable[[torch.Tensor], torch.Tensor], prompts: list[np.ndarray], count: int,
                     *, length: int, prompt_tokens: int = 16, temperature: float = 1.0, seed: int = 0,
                     batch_size: int = 64, device: str = "cpu", progress: bool = True) -> list[np.ndarray]:
    """`count` windows of `length` tokens for distillation: the first `prompt_tokens` of a prompt
    window (cycled), then tokens sampled from `teacher` at `temperature`.

    Data-free distillation in the manner of LLM-QAT (Liu et al., arXiv 2305.17888), seeded with
    real text: the student learns the teacher on text the teacher itself would write, as many
    windows as wanted, rather than on a few hundred real windows seen again every epoch. On
    SmolLM2 W8A8 (448 pydoc windows + 2048 generated, H200) it stopped the drift below the
    teacher's perplexity but did not raise top-1 agreement on pydoc text (bench/RESULTS.md).
    Deterministic for a seed on one device. Windows are [1, length] int64 arrays, like
    `samples.lm_windows`'.
    """
    if count < 1 or not prompts or not 0 < prompt_tokens < length or temperature <= 0:
        raise OptionError("generate_windows needs count >= 1, prompts, 0 < prompt_tokens < length and temperature > 0")
    short = [i for i, p in enumerate(prompts) if np.asarray(p).shape[-1] < prompt_tokens]
    if short:
        raise OptionError(f"generate_windows: prompt {short[0]} has fewer than {prompt_tokens} tokens")
    teacher_fn = _teacher_fn(teacher, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    heads = [np.asarray(prompts[i % len(prompts)]).reshape(-1)[:prompt_tokens] for i in range(count)]
    out: list[np.ndarray] = []
    starts = range(0, count, batch_size)
    for start in activations.progress_bar(starts, len(starts), "qat: generating windows", progress):
        ids = torch.from_numpy(np.stack(heads[start:start + batch_size]).astype(np.int64)).to(device)
        with torch.no_grad():
            while ids.shape[1] < length:
                logits = teacher_fn(ids)[:, -1].float() / temperature
                token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
                ids = torch.cat([ids, token], dim=1)
        out.extend(row[None, :] for row in ids.cpu().numpy())
    if isinstance(teacher, Model):
        teacher.fx = _to_device(teacher.fx, "cpu")
    return out


class _WindowOrder:
    """Window index of each position in the stream of training windows: in order, or (a seed)
    every epoch a permutation of its own."""

    def __init__(self, count: int, seed: int | None):
        self.count, self.seed, self.epochs = count, seed, {}

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.count)
        if self.seed is None:
            return offset
        if epoch not in self.epochs:
            self.epochs = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.count)}
        return int(self.epochs[epoch][offset])


class _Validator:
    """Top-1 agreement with the teacher on held-out windows, and the state that scored best."""

    def __init__(self, teacher_fn, windows: list[np.ndarray], device: str):
        self.ids = [_window(w, device) for w in windows]
        with torch.no_grad():
            self.targets = [teacher_fn(ids).argmax(-1) for ids in self.ids]
        self.best_score, self.best_state = -1.0, None

    def measure(self, gm, step: int, report: TrainReport) -> None:
        hits = total = 0
        with torch.no_grad():
            for ids, target in zip(self.ids, self.targets):
                logits = _logits(gm, ids)
                hits += int((logits.argmax(-1) == target).sum())
                total += target.numel()
        score = hits / total
        report.validation.append((step, score))
        if score > self.best_score:  # the earliest of equals: fewer steps away from the teacher
            self.best_score, report.best_step = score, step
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in gm.state_dict().items()}

    def restore(self, gm, report: TrainReport) -> None:
        if report.best_step != report.validation[-1][0]:
            gm.load_state_dict(self.best_state)


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over points of the relative squared error ‖s − t‖² / ‖t‖² (each point weighs alike,
    whatever its scale: a layer's massive activations do not drown the others)."""
    errors = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
              for s, t in zip(student, teacher, strict=True)]
    return torch.stack(errors).mean()


def _with_outputs(gm, names: list[str], model_name: str):
    """A GraphModule sharing `gm`'s parameters that returns (logits, *the nodes named `names`)."""
    graph = torch.fx.Graph()
    copied: dict = {}
    out = graph.graph_copy(gm.graph, copied)
    by_name = {old.name: new for old, new in copied.items()}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UnsupportedGraphError(f"qat.train: '{model_name}' has no node '{missing[0]}' to distil features at "
                                    f"(the student must be a copy of the teacher's graph)")
    graph.output((out[0] if isinstance(out, (tuple, list)) else out, *(by_name[n] for n in names)))
    return torch.fx.GraphModule(gm, graph)


def _outputs(gm, ids: torch.Tensor) -> tuple:
    """An exported causal LM's outputs as a tuple, the logits first."""
    out = gm(ids)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _logits(gm, ids: torch.Tensor) -> torch.Tensor:
    """The logits of an exported causal LM (its first output when it returns several)."""
    return _outputs(gm, ids)[0]


def _window(tokens: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.atleast_2d(tokens).astype(np.int64)).to(device)


def _to_device(gm, device: str):
    """Move parameters and the devices torch.export baked into the graph (arange, ones, to, ...)."""
    from torch.fx.node import map_aggregate

    gm = gm.to(device)
    # the device the tensors are on ("cuda" names no index; tensors say cuda:0, and compiled
    # graphs check baked devices against theirs)
    target = next(iter(gm.parameters()), torch.empty(0, device=device)).device
    retarget = lambda v: target if isinstance(v, torch.device) else v  # noqa: E731
    for module in gm.modules():  # nested GraphModules too (some torch versions export submodules)
        if not isinstance(module, torch.fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            args, kwargs = map_aggregate(node.args, retarget), map_aggregate(node.kwargs, retarget)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed = True
        if changed:
            module.recompile()
    return gm


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _teacher_fn(teacher, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if not isinstance(teacher, Model):
        return teacher
    teacher.require("fx", "qat.train teacher")
    teacher.fx = gm = _to_device(teacher.fx, device)
    return functools.partial(_logits, gm)


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
    sites = {s.weight: s for s in activations.linear_sites(lowered)}
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
