"""Distillation on the FX form: the losses (KD, reverse KL, BiLD, features) and the training loop
that fine-tunes a fake-quantized student against its float teacher."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from graphopt.analysis.capture import progress_bar
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir import Model
from graphopt.training.fake_quant import fake_quant_modules, quantizer_nodes

__all__ = ["kd_loss", "reverse_kd_loss", "bild_loss", "feature_loss", "TrainConfig", "train", "TrainReport",
           "generate_windows"]

Loss = Literal["kd", "rkl", "bild"]
DEFAULT_TEMPERATURE = {"kd": 2.0, "rkl": 1.0, "bild": 3.0}


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
def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """How `train` fine-tunes a fake-quantized student: every option once, with its default.

    Groups: the schedule (`steps`, `batch_size`, `warmup`, `shuffle`), the optimiser (`lr`,
    `scale_lr`, `weight_scale_lr`, `weight_decay`, `clip`, `train_weights`), the loss (`loss`,
    `temperature`, `top_k`, `feature_weight`), the teacher's targets (`cache_teacher`), validation
    (`validate_every`) and execution (`device`, `fused`, `compile`, `progress`). Construction
    checks every value and raises OptionError naming the option.
    """

    # schedule
    steps: int = _option(100, "optimiser steps")
    batch_size: int = _option(1, "windows per step, taken in order and cycled (or shuffled per epoch)")
    warmup: int = _option(0, "steps of linear warm-up before the cosine decay to 0")
    shuffle: int | None = _option(None, "seed: each epoch visits the windows in its own random order; None: in order")
    # optimiser (AdamW)
    lr: float = _option(1e-5, "learning rate of the weights")
    scale_lr: float = _option(1e-3, "learning rate of the activation quantizers' log-scales")
    weight_scale_lr: float | None = _option(
        None, "learning rate of the weight quantizers' log-scales (None: scale_lr; 0 keeps a GPTQ start's grids)")
    weight_decay: float = _option(0.0, "AdamW decay of the weights (scales never decay)")
    clip: float = _option(1.0, "gradient-norm clipping over every trained parameter")
    train_weights: bool = _option(True, "train the weights too, not only the scales")
    # loss
    loss: Loss = _option("kd", "kd (Hinton KD), rkl (reverse KL) or bild (BiLD top-k logit differences)")
    temperature: float | None = _option(None, "distillation temperature (None: kd 2, rkl 1, bild 3)")
    top_k: int = _option(8, "BiLD: logits compared per position")
    feature_weight: float = _option(
        0.0, "adds this many times feature_loss between every linear's quantized input and the teacher's float value")
    # teacher targets
    cache_teacher: bool = _option(
        True, "keep each window's teacher logits (fp16) for later epochs instead of recomputing them every step")
    # validation
    validate_every: int = _option(0, "steps between validation measurements (0: a tenth of the steps)")
    # execution
    device: str = _option("cpu", "torch device of the training step")
    fused: bool = _option(False, "8-bit quantizers use torch's fused fake-quant kernels")
    compile: bool = _option(False, "run the training forward and backward through torch.compile")
    progress: bool = _option(True, "show a progress bar")

    def __post_init__(self):
        if self.loss not in DEFAULT_TEMPERATURE:
            raise OptionError(f"TrainConfig: option 'loss' must be one of {', '.join(DEFAULT_TEMPERATURE)}, "
                              f"got '{self.loss}'")
        for name in ("steps", "batch_size", "top_k"):
            if getattr(self, name) < 1:
                raise OptionError(f"TrainConfig: option '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "validate_every", "lr", "scale_lr", "weight_decay", "feature_weight"):
            if getattr(self, name) < 0:
                raise OptionError(f"TrainConfig: option '{name}' must be >= 0, got {getattr(self, name)}")
        if self.weight_scale_lr is not None and self.weight_scale_lr < 0:
            raise OptionError(f"TrainConfig: option 'weight_scale_lr' must be >= 0, got {self.weight_scale_lr}")
        if self.temperature is not None and self.temperature <= 0:
            raise OptionError(f"TrainConfig: option 'temperature' must be > 0, got {self.temperature}")
        if self.clip <= 0:
            raise OptionError(f"TrainConfig: option 'clip' must be > 0, got {self.clip}")

    @property
    def distillation_temperature(self) -> float:
        """`temperature`, or the loss's own default."""
        return self.temperature or DEFAULT_TEMPERATURE[self.loss]

    @property
    def weight_scales_lr(self) -> float:
        """The weight quantizers' scale learning rate (`weight_scale_lr`, else `scale_lr`)."""
        return self.scale_lr if self.weight_scale_lr is None else self.weight_scale_lr


@dataclass
class TrainReport:
    """What `train` did: steps, seconds, the loss of every step, and the validation curve."""

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
    config: TrainConfig = TrainConfig(),
    *,
    validation: list[np.ndarray] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> TrainReport:
    """Fine-tune `student` (FX, with quantizers) in place to match `teacher` on token `windows`.

    `teacher` is the float Model the student was copied from, or any callable ids -> logits (then
    `config.feature_weight` must be 0: feature distillation reads the teacher's graph). Each step
    takes the next `config.batch_size` windows, computes the teacher's targets, and takes one
    AdamW step on the loss `config.loss` (weights, activation scales and weight scales each at
    their own learning rate; linear warm-up then cosine decay to 0; gradient norm clipped).

    `validation` windows (held out from `windows`) are scored before training, every
    `config.validate_every` steps and at the end by the student's top-1 agreement with the
    teacher; the student ends with the weights and scales of the best score (the earliest among
    equals), recorded in `TrainReport.validation` and `best_step`.

    Guarantees: the student's graph is unchanged, only its parameters move; afterwards it is on
    the CPU, its quantizers use the reference formula and every log-scale is trainable again,
    its weights are not. A teacher Model is moved back to the CPU too.
    """
    _check(student, teacher, windows, config)
    quantizers = list(fake_quant_modules(student).values())
    for module in quantizers:
        module.fused = config.fused
    gm = _to_device(student.fx, config.device)
    groups, weights = _optimizer_groups(gm, quantizers, config)
    optimizer = torch.optim.AdamW(groups)
    bases = [g["lr"] for g in optimizer.param_groups]
    forward, targets = _forward_and_targets(gm, student, teacher, windows, config)
    report = TrainReport(config.steps, 0.0, loss=config.loss, device=config.device)
    validator = _Validator(_teacher_fn(teacher, config.device), validation, config.device) if validation else None
    every = config.validate_every or max(1, config.steps // 10)
    if validator:
        validator.measure(gm, 0, report)
    order = _WindowOrder(len(windows), config.shuffle)
    start = time.perf_counter()
    bar = progress_bar(range(config.steps), config.steps, f"qat ({config.loss})", config.progress)
    for step in bar:
        factor = _lr_factor(step, config.steps, config.warmup)
        for group, base in zip(optimizer.param_groups, bases):
            group["lr"] = base * factor
        indices = [order[step * config.batch_size + k] for k in range(config.batch_size)]
        ids = torch.cat([_window(windows[i], config.device) for i in indices])
        report.losses.append(_step(forward, optimizer, groups, ids, targets(indices, ids), config))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{report.losses[-1]:.4f}")
        if (step + 1) % max(1, config.steps // 10) == 0:
            recent = report.losses[-10:]
            log(f"qat: step {step + 1}/{config.steps} loss {sum(recent) / len(recent):.4f}")
        if validator and ((step + 1) % every == 0 or step + 1 == config.steps):
            validator.measure(gm, step + 1, report)
            log(f"qat: step {step + 1} validation overlap@1 {report.validation[-1][1]:.4f}")
    if validator:
        validator.restore(gm, report)
        log(f"qat: kept step {report.best_step} (validation overlap@1 {max(v for _, v in report.validation):.4f})")
    report.seconds = time.perf_counter() - start
    _release(quantizers, weights)
    student.fx = _to_device(gm, "cpu")
    if isinstance(teacher, Model):
        teacher.fx = _to_device(teacher.fx, "cpu")
    return report


def _check(student: Model, teacher, windows: list, config: TrainConfig) -> None:
    student.require("fx", "distillation.train")
    if not windows:
        raise OptionError("distillation.train: no training windows (its steps need at least one)")
    if config.feature_weight and not isinstance(teacher, Model):
        raise OptionError("distillation.train: feature_weight needs the teacher as a Model (its graph's nodes)")
    if not fake_quant_modules(student):
        raise UnsupportedGraphError(f"'{student.name}' has no fake quantizers: run the fake_quantize pass first")


def _optimizer_groups(gm, quantizers: list, config: TrainConfig) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """AdamW parameter groups (activation scales; weight scales unless their lr is 0; the weights
    when trained), with requires_grad set to match. Returns the groups and the weights."""
    weight_scales = [m.log_scale for m in quantizers if m.kind == "weight"]
    for p in weight_scales:
        p.requires_grad_(bool(config.weight_scales_lr))
    weights = [p for n, p in gm.named_parameters() if not n.endswith("log_scale")]
    for p in weights:
        p.requires_grad_(config.train_weights)
    groups = [{"params": [m.log_scale for m in quantizers if m.kind == "activation"], "lr": config.scale_lr,
               "weight_decay": 0.0}]
    if config.weight_scales_lr:
        groups.append({"params": weight_scales, "lr": config.weight_scales_lr, "weight_decay": 0.0})
    if config.train_weights:
        groups.append({"params": weights, "lr": config.lr, "weight_decay": config.weight_decay})
    return groups, weights


def _release(quantizers: list, weights: list[torch.nn.Parameter]) -> None:
    """After training: reference formula, every scale trainable again, weights frozen."""
    for module in quantizers:
        module.fused = False
        module.log_scale.requires_grad_(True)
    for p in weights:
        p.requires_grad_(False)


def _forward_and_targets(gm, student: Model, teacher, windows: list[np.ndarray], config: TrainConfig):
    """The student's training forward (compiled on request) and `targets(indices, ids)`, which
    returns (teacher logits in float32, the teacher's float values at the student's activation
    points when feature distillation is on, else an empty list)."""
    teacher_fn = _teacher_fn(teacher, config.device)
    trained = gm
    if config.feature_weight:
        # both graphs also return the values at the activation points: quantized in the student,
        # float in the teacher (the quantizer's input node, which the teacher's graph has too)
        points = [n for n in quantizer_nodes(gm) if gm.get_submodule(n.target).kind == "activation"]
        teacher_fn = _with_outputs(teacher.fx, [n.args[0].name for n in points], teacher.name)
        trained = _with_outputs(gm, [n.name for n in points], student.name)
    forward = torch.compile(trained) if config.compile else trained
    cache: dict[int, torch.Tensor] = {}

    def targets(indices: list[int], ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            if config.feature_weight:
                logits, *points = teacher_fn(ids)
                return logits.float(), points
            if not config.cache_teacher:
                return teacher_fn(ids).float(), []
            for index in indices:
                if index not in cache:
                    cache[index] = teacher_fn(_window(windows[index], config.device)).to(torch.float16)
            return torch.cat([cache[i] for i in indices]).float(), []

    return forward, targets


def _distillation_loss(logits: torch.Tensor, target: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    temperature = config.distillation_temperature
    if config.loss == "bild":
        return bild_loss(logits, target, config.top_k, temperature)
    return (kd_loss if config.loss == "kd" else reverse_kd_loss)(logits, target, temperature)


def _step(forward, optimizer, groups: list[dict], ids: torch.Tensor,
          target: tuple[torch.Tensor, list[torch.Tensor]], config: TrainConfig) -> float:
    """One optimisation step on a batch; returns its loss."""
    teacher_logits, teacher_points = target
    logits, *student_points = _outputs(forward, ids)
    value = _distillation_loss(logits, teacher_logits, config)
    if config.feature_weight:
        value = value + config.feature_weight * feature_loss(student_points, teacher_points)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], config.clip)
    optimizer.step()
    return float(value.detach())


def generate_windows(teacher: Model | Callable[[torch.Tensor], torch.Tensor], prompts: list[np.ndarray], count: int,
                     *, length: int, prompt_tokens: int = 16, temperature: float = 1.0, seed: int = 0,
                     batch_size: int = 64, device: str = "cpu", progress: bool = True) -> list[np.ndarray]:
    """`count` windows of `length` tokens for distillation: the first `prompt_tokens` of a prompt
    window (cycled), then tokens sampled from `teacher` at `temperature`.

    Data-free distillation in the manner of LLM-QAT (Liu et al., arXiv 2305.17888), seeded with
    real text: the student learns the teacher on text the teacher itself would write, as many
    windows as wanted, rather than on a few hundred real windows seen again every epoch.
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
    for start in progress_bar(starts, len(starts), "qat: generating windows", progress):
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
        raise UnsupportedGraphError(f"distillation.train: '{model_name}' has no node '{missing[0]}' to distil features at "
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
    teacher.require("fx", "distillation.train teacher")
    teacher.fx = gm = _to_device(teacher.fx, device)
    return functools.partial(_logits, gm)


