"""nm_sparsity: zero weights of linear layers to an N:M pattern or an unstructured ratio (magnitude, Wanda, SparseGPT)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import sparsity
from graphopt.analysis.capture import InputHessian, capture, progress_bar
from graphopt.analysis.linear_sites import linear_sites
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir import Model
from graphopt.ir.fx_graph import get_weight, set_parameter
from graphopt.ir.names import name_matches
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass

__all__ = ["NMSparsity"]


@dataclass
class _Target:
    """One weight to prune: its name, its [out, in] axis of inputs, the activation entering it."""

    weight: str
    in_axis: int
    activation: str
    pattern: sparsity.Pattern
    block: str | None = None


def _linear_targets_onnx(model: Model, opts: "NMSparsity", skipped: dict[str, str]) -> tuple[list, list[_Target]]:
    """(all 2-D MatMul/Gemm sites, the targets among them after skip lists and the shared-weight guard)."""
    tensors = model.graph.tensors()
    sites = [s for s in linear_sites(model) if s.op in ("MatMul", "Gemm")]
    targets = []
    for site in sites:
        reason = _skip_reason(site.weight, opts)
        if reason is None and len(tensors[site.weight].outputs) > 1:
            # a tied table (e.g. lm_head + embedding Gather) would be pruned for a use we never measured
            reason = "shared"
        if reason:
            skipped[site.weight] = reason
            continue
        targets.append(_Target(site.weight, site.in_axis, site.activation, opts.pattern_for(site.weight),
                               _block_of(site.weight, opts.block_pattern)))
    return sites, targets


def _skip_reason(name: str, opts: "NMSparsity") -> str | None:
    return "skip" if name_matches(name, opts.skip) else None


def _block_of(weight: str, block_pattern: str) -> str | None:
    found = re.match(block_pattern, weight) if block_pattern else None
    return found.group(1) if found else None


@dataclass(frozen=True)
@register_pass
class NMSparsity(Pass):
    """Zero weights of MatMul/Gemm (ONNX) or aten.linear (FX) layers to N:M or an unstructured ratio.

    Reads calibration feeds (`ctx.calib`) for 'wanda' and 'sparsegpt' (and, when given, for the
    reconstruction error of 'magnitude'). Rewrites:

    1. Every 2-D linear weight not matched by `skip` (globs, or 're:' regexes; default: lm_head and
       embeddings) and not read by any other node gets a mask: N of every M consecutive inputs kept
       (`pattern: "2:4"`), or `sparsity` of its weights zeroed (`pattern: unstructured`; per output
       row, per layer, or one global threshold by `scope`). `overrides` maps weight globs to their
       own pattern ("4:8") or ratio (0.3).
    2. Importance: |W| (magnitude), |W|·‖X_j‖ (Wanda), or SparseGPT's w²/[H⁻¹]ⱼⱼ² with the OBS
       update of the kept weights in column blocks (graphopt.sparsity.sparsegpt).
    3. `sequential` (default): transformer blocks (`block_pattern` on weight names) are pruned in
       order and each block's calibration activations come from the already pruned blocks before it
       (ONNX: the block's input is captured and fed to a sub-graph of the block; FX: one batched
       forward where each linear is pruned when reached, when the inputs take a batch: not a
       portable decoder's, fixed at 1). Otherwise one-shot from the dense model.
    Does NOT fire when every linear is skipped or the targets ask for 0 % (`changed` False, model
    untouched). Raises UnsupportedGraphError when an input dim is not a multiple of M.

    Guarantees: every touched weight is verified against its pattern (raises if violated); shapes
    and graph structure are unchanged. Leaves `model.meta.masks[weight] = {"pattern", "sparsity",
    "axis" (input axis), "method"}` so `quantize` keeps zeros at zero and backends see the pattern.
    Stats: per-layer sparsity and relative reconstruction error ‖XW−XŴ‖/‖XW‖ on calibration data.
    """

    name: ClassVar[str] = "nm_sparsity"
    mutates_input: ClassVar[bool] = True

    pattern: str = field(default="2:4", metadata={"help": "'N:M' (N kept of every M inputs) or 'unstructured'"})
    sparsity: float = field(default=0.5, metadata={"help": "fraction of zeros when pattern is unstructured"})
    method: Literal["magnitude", "wanda", "sparsegpt"] = field(default="sparsegpt", metadata={"help": "importance"})
    scope: Literal["row", "layer", "global"] = field(default="row", metadata={"help": "unstructured: per output row, per layer, or global"})
    skip: tuple[str, ...] = field(default=("lm_head*", "*embed*"), metadata={"help": "weight globs (or 're:regex') left dense"})
    overrides: dict[str, str | float] = field(default_factory=dict, metadata={"help": "weight glob -> 'N:M' or ratio"})
    sequential: bool = field(default=True, metadata={"help": "calibrate each block on the already pruned blocks"})
    block_pattern: str = field(default=r"(.*\.(?:layers|layer|h|blocks)\.\d+)\.", metadata={"help": "regex whose group 1 names a block"})
    blocksize: int = field(default=128, metadata={"help": "SparseGPT column block"})
    dampening: float = field(default=0.01, metadata={"help": "SparseGPT: fraction of mean diag(H) added to H"})

    def check(self) -> None:
        sparsity.parse_pattern(self.pattern, self.sparsity, option="pattern")
        if not 0.0 <= self.sparsity < 1.0:
            raise OptionError(f"'nm_sparsity': option 'sparsity' must be in [0, 1), got {self.sparsity}")
        for key, value in self.overrides.items():
            sparsity.parse_pattern(value, option=f"overrides[{key!r}]")
        if self.scope == "global" and self.method == "sparsegpt":
            raise OptionError("'nm_sparsity': option 'scope' 'global' needs method magnitude or wanda "
                              "(SparseGPT chooses its mask per column block)")
        if self.blocksize < 1:
            raise OptionError(f"'nm_sparsity': option 'blocksize' must be >= 1, got {self.blocksize}")
        if not 0.0 <= self.dampening < 1.0:
            raise OptionError(f"'nm_sparsity': option 'dampening' must be in [0, 1), got {self.dampening}")
        try:
            re.compile(self.block_pattern)
        except re.error as exc:
            raise OptionError(f"'nm_sparsity': option 'block_pattern' is not a regex: {exc}") from None

    def pattern_for(self, weight: str) -> sparsity.Pattern:
        for glob, value in self.overrides.items():
            if name_matches(weight, (glob,)):
                return sparsity.parse_pattern(value, option=f"overrides[{glob!r}]")
        return sparsity.parse_pattern(self.pattern, self.sparsity)

    # ------------------------------------------------------------------------ ONNX
    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        skipped: dict[str, str] = {}
        sites, targets = _linear_targets_onnx(model, self, skipped)
        targets = [t for t in targets if t.pattern.target > 0 or self.scope == "global"]
        if not targets:
            return PassResult(model, False, {"layers": [], "skipped": skipped})
        calib = ctx.require_calib(self.name) if self.method != "magnitude" else ctx.calib
        tensors = model.graph.tensors()
        pruner = _Pruner(self, ctx)
        if calib and self.sequential and self.scope != "global":
            plan = _block_plan(model, sites, targets, self.block_pattern)
            if plan is None:
                pruner.note = "one-shot: no block boundaries found"
            else:
                _run_sequential_onnx(model, plan, calib, pruner, tensors)
        if pruner.pending(targets):
            hessians = {}
            if calib:
                acts = list(dict.fromkeys(t.activation for t in targets))
                hessians = capture(model, calib, acts, lambda _: InputHessian(),
                                               progress=ctx.progress, desc="nm_sparsity: calibrating")
            pruner.set_global_threshold(targets, lambda t: _canonical(tensors[t.weight], t), hessians)
            for target in progress_bar(pruner.pending(targets), None, "nm_sparsity: pruning", ctx.progress):
                _prune_onnx(target, tensors, hessians.get(target.activation), pruner)
        return pruner.result(model, skipped)

    # -------------------------------------------------------------------------- FX
    def run_fx(self, model: Model, ctx: PassContext) -> PassResult:
        import torch

        gm = model.fx
        skipped: dict[str, str] = {}
        targets = _linear_targets_fx(gm, self, skipped)
        targets = [t for t in targets if t.pattern.target > 0 or self.scope == "global"]
        if not targets:
            return PassResult(model, False, {"layers": [], "skipped": skipped})
        calib = ctx.require_calib(self.name) if self.method != "magnitude" else ctx.calib
        pruner = _Pruner(self, ctx)
        by_node = {t.activation: t for t in targets}  # activation holds the FX node name here
        if calib:
            args_list = [[torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in model.inputs] for feed in calib]
            # one batch of all feeds needs equal shapes and a batch axis the traced graph left dynamic
            stackable = (len({tuple(a.shape for a in args) for args in args_list}) == 1
                         and all(spec.shape and isinstance(spec.shape[0], str) for spec in model.inputs))
            if self.sequential and self.scope != "global" and stackable:
                batched = [torch.cat([args[i] for args in args_list]) for i in range(len(model.inputs))]
                with torch.no_grad():
                    _FxPruner(gm, by_node, pruner).run(*batched)
            else:
                hessians = _fx_hessians(gm, by_node, args_list)
                weights = {t.weight: _fx_canonical(gm, t) for t in targets}
                pruner.set_global_threshold(targets, lambda t: weights[t.weight], {t.activation: h for t, h in
                                                                                    ((by_node[k], v) for k, v in hessians.items())})
                for target in pruner.pending(targets):
                    new = pruner.prune(target, weights[target.weight], hessians.get(target.activation))
                    if new is not None:
                        _fx_set_param(gm, target, new)
        else:
            pruner.set_global_threshold(targets, lambda t: _fx_canonical(gm, t), {})
            for target in pruner.pending(targets):
                new = pruner.prune(target, _fx_canonical(gm, target), None)
                if new is not None:
                    _fx_set_param(gm, target, new)
        return pruner.result(model, skipped)


# ------------------------------------------------------------------------------ shared driver
class _Pruner:
    """Prunes one weight at a time, verifies it, and keeps the per-layer rows and mask records."""

    def __init__(self, opts: NMSparsity, ctx: PassContext):
        self.opts, self.ctx = opts, ctx
        self.rows: list[dict] = []
        self.masks: dict[str, dict] = {}
        self.done: set[str] = set()
        self.threshold: float | None = None
        self.note = ""

    def pending(self, targets: list[_Target]) -> list[_Target]:
        return [t for t in targets if t.weight not in self.done]

    def set_global_threshold(self, targets, canonical_of, hessians) -> None:
        """For scope 'global': one score threshold over every unstructured target without an override."""
        if self.opts.scope != "global":
            return
        scores = []
        for t in targets:
            w = canonical_of(t)
            h = hessians.get(t.activation)
            if self.opts.method == "wanda" and h is None:
                raise UnsupportedGraphError(f"'nm_sparsity': no calibration activations reached weight '{t.weight}'")
            scores.append(sparsity.magnitude_scores(w) if self.opts.method == "magnitude"
                          else sparsity.wanda_scores(w, np.sqrt(np.diag(h.hessian))))
        self.threshold = sparsity.global_threshold(scores, self.opts.sparsity)

    def prune(self, target: _Target, w: np.ndarray, accumulator) -> np.ndarray | None:
        """The pruned [out, in] weight, or None when nothing changed. Verifies the pattern."""
        self.done.add(target.weight)
        if target.pattern.structured and w.shape[1] % target.pattern.m:
            raise UnsupportedGraphError(
                f"'nm_sparsity': weight '{target.weight}' has {w.shape[1]} inputs, not a multiple of "
                f"{target.pattern.m} ({target.pattern.label}); add it to 'skip' or give it an 'overrides' entry")
        hessian = accumulator.hessian if accumulator is not None else None
        if self.opts.method != "magnitude" and hessian is None:
            raise UnsupportedGraphError(f"'nm_sparsity': no calibration activations reached weight '{target.weight}'")
        threshold = self.threshold if self.opts.scope == "global" and target.weight not in self._overridden() else None
        new, keep = sparsity.prune(w, target.pattern, self.opts.method, hessian=hessian,
                                   scope="row" if self.opts.scope == "global" else self.opts.scope,
                                   threshold=threshold, blocksize=self.opts.blocksize, dampening=self.opts.dampening)
        sparsity.check_pattern(new, target.pattern, 1, target.weight, keep)
        if np.array_equal(new, w):
            return None
        achieved = sparsity.sparsity_of(new)
        label = "unstructured" if threshold is not None else target.pattern.label
        self.masks[target.weight] = {"pattern": label, "sparsity": achieved, "axis": target.in_axis,
                                     "method": self.opts.method}
        self.rows.append({
            "name": target.weight, "pattern": label, "sparsity": achieved,
            "recon_error": sparsity.reconstruction_error(w, new, hessian) if hessian is not None else None,
        })
        return new

    def _overridden(self) -> set[str]:
        return {t for t in self.done if self.opts.overrides and name_matches(t, tuple(self.opts.overrides))}

    def result(self, model: Model, skipped: dict[str, str]) -> PassResult:
        model.meta.masks.update(self.masks)
        errors = [r["recon_error"] for r in self.rows if r["recon_error"] is not None]
        total = sum(int(np.prod(_shape(model, r["name"]))) for r in self.rows)
        zeros = sum(r["sparsity"] * int(np.prod(_shape(model, r["name"]))) for r in self.rows)
        stats = {
            "method": self.opts.method, "pattern": self.opts.pattern if self.opts.pattern != "unstructured"
            else f"unstructured {self.opts.sparsity:g}",
            "layers_pruned": len(self.rows), "sparsity": zeros / total if total else 0.0,
            "mean_recon_error": float(np.mean(errors)) if errors else None,
            "skipped": skipped, "layers": self.rows,
        }
        if self.note:
            stats["note"] = self.note
        return PassResult(model, bool(self.rows), stats)


def _shape(model: Model, name: str) -> tuple[int, ...]:
    if model.form == "onnx":
        return model.graph.tensors()[name].values.shape
    return tuple(get_weight(model.fx, name).shape)


# ---------------------------------------------------------------------------------- ONNX
def _canonical(const: gs.Constant, target: _Target) -> np.ndarray:
    return sparsity.to_canonical(np.asarray(const.values, dtype=np.float32), target.in_axis)


def _prune_onnx(target: _Target, tensors, accumulator, pruner: _Pruner) -> None:
    const = tensors[target.weight]
    new = pruner.prune(target, _canonical(const, target), accumulator)
    if new is not None:
        # weights are shared between Model copies: assign a new array, never write into the old one
        const.values = sparsity.from_canonical(new, target.in_axis).astype(const.values.dtype)


@dataclass
class _Block:
    name: str
    targets: list[_Target]
    activations: list[str]
    output: str | None  # the residual-stream tensor leaving the block (None: the last block)


def _block_plan(model: Model, sites, targets: list[_Target], block_pattern: str) -> list[_Block] | None:
    """Blocks in graph order with the tensor each one hands to the next, or None when the graph has no
    recognisable blocks (then calibration is one-shot). A block's output is the Add that joins its last
    linear's output (skipped or not) to the residual stream."""
    tensors = model.graph.tensors()
    order, by_block = [], {}
    for site in sites:
        block = _block_of(site.weight, block_pattern)
        if block is None:
            continue
        if block not in by_block:
            by_block[block] = []
            order.append(block)
        by_block[block].append(site)
    if not order or any(t.block is None for t in targets):
        return None
    plan = []
    for i, block in enumerate(order):
        last = i == len(order) - 1
        add = next((n for n in tensors[by_block[block][-1].output].outputs if n.op == "Add"), None)
        if add is None and not last:
            return None
        mine = [t for t in targets if t.block == block]
        plan.append(_Block(block, mine, list(dict.fromkeys(t.activation for t in mine)),
                           None if last else add.outputs[0].name))
    while plan and not plan[-1].targets:  # blocks after the last pruned one need no forward
        plan.pop()
    return plan


def _sub_model(model: Model, cut: str | None, outputs: list[str]) -> Model:
    """The part of the graph between tensor `cut` (made a graph input) and `outputs`."""
    graph = model.graph.copy()
    by_name = graph.tensors()
    if cut is not None:
        tensor = by_name[cut]
        tensor.inputs.clear()
        tensor.dtype = tensor.dtype or np.float32
        graph.inputs.append(tensor)
    graph.outputs = [by_name[name] for name in outputs]
    for tensor in graph.outputs:
        tensor.dtype = tensor.dtype or np.float32
    graph.cleanup(remove_unused_graph_inputs=False)
    return model.replace(graph=graph, meta=model.meta)


def _run_sequential_onnx(model: Model, plan: list[_Block], calib, pruner: _Pruner, tensors) -> None:
    """Prune block by block; each block's Hessians come from the pruned blocks before it."""
    feeds = [dict(feed) for feed in calib]
    cut = None
    for block in progress_bar(plan, len(plan), "nm_sparsity: blocks", pruner.ctx.progress):
        if block.activations:
            sub = _sub_model(model, cut, block.activations)
            hessians = capture(sub, feeds, block.activations, lambda _: InputHessian(),
                                           progress=False)
            for target in block.targets:
                _prune_onnx(target, tensors, hessians.get(target.activation), pruner)
            del hessians
        if block.output is None or block is plan[-1]:
            break
        sub = _sub_model(model, cut, [block.output])
        session = sub.session()
        names = [i.name for i in session.get_inputs()]
        for feed in feeds:
            feed[block.output] = session.run([block.output], {n: feed[n] for n in names})[0]
            if cut is not None:
                del feed[cut]
        cut = block.output


# ------------------------------------------------------------------------------------ FX
def _linear_targets_fx(gm, opts: NMSparsity, skipped: dict[str, str]) -> list[_Target]:
    """aten.linear (weight [out, in]) and aten.mm (weight [in, out]) nodes whose weight is a get_attr."""
    import torch

    uses: dict[int, int] = {}
    for node in gm.graph.nodes:
        value = get_weight(gm, node.target) if node.op == "get_attr" else None
        if isinstance(value, torch.Tensor):
            uses[value.data_ptr()] = uses.get(value.data_ptr(), 0) + len(node.users)
    targets = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.linear.default, torch.ops.aten.mm.default):
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        if getattr(weight, "op", None) != "get_attr" or get_weight(gm, weight.target).dim() != 2:
            continue
        name = weight.target
        reason = _skip_reason(name, opts)
        if reason is None and uses[get_weight(gm, name).data_ptr()] > 1:
            reason = "shared"
        if reason:
            skipped[name] = reason
            continue
        in_axis = 1 if node.target == torch.ops.aten.linear.default else 0
        targets.append(_Target(name, in_axis, node.name, opts.pattern_for(name), _block_of(name, opts.block_pattern)))
    return targets


def _fx_canonical(gm, target: _Target) -> np.ndarray:
    return sparsity.to_canonical(get_weight(gm, target.weight).detach().float().numpy(), target.in_axis)


def _fx_set_param(gm, target: _Target, canonical: np.ndarray) -> None:
    """Replace (never write into) the parameter behind `target` with the pruned [out, in] weight."""
    set_parameter(gm, target.weight, sparsity.from_canonical(canonical, target.in_axis))


def _fx_hessians(gm, by_node: dict[str, _Target], args_list) -> dict:
    """One-shot: input Hessians of every target linear over the calibration batches (dense model)."""
    import torch

    hessians = {name: InputHessian() for name in by_node}

    class _Observe(torch.fx.Interpreter):
        def run_node(self, n):
            if n.name in by_node:
                x = self.env[n.args[0]]
                hessians[n.name].update(x.detach().float().numpy())
            return super().run_node(n)

    with torch.no_grad():
        for args in args_list:
            _Observe(gm).run(*args)
    return hessians


def _make_fx_pruner():
    import torch

    class FxPruner(torch.fx.Interpreter):
        """Runs the (batched) calibration forward once; each target linear is pruned when reached, from
        the activations the already pruned layers produce, and then computed with its pruned weight."""

        def __init__(self, gm, by_node, pruner):
            super().__init__(gm)
            self.by_node, self.pruner = by_node, pruner

        def run_node(self, n):
            target = self.by_node.get(n.name)
            if target is None:
                return super().run_node(n)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            hessian = InputHessian()
            hessian.update(args[0].detach().float().numpy())
            new = self.pruner.prune(target, _fx_canonical(self.module, target), hessian)
            if new is not None:
                _fx_set_param(self.module, target, new)
                args = (args[0], get_weight(self.module, target.weight)) + tuple(args[2:])
            return n.target(*args, **kwargs)

    return FxPruner


def _FxPruner(gm, by_node, pruner):
    return _make_fx_pruner()(gm, by_node, pruner)
