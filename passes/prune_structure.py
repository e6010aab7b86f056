"""prune_structure: remove attention KV groups/heads, FFN channels and conv channels, shapes rewritten."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.capture import ChannelMoments, capture
from graphopt.analysis.pruning_graph import AttentionGroup, ConvGroup, FFNGroup, StructureMap, find_structures
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.files.reading import read_json, want_dict, want_list, want_number
from graphopt.ir import Model
from graphopt.ir.decoder import DecoderSpec, set_kv_heads
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass

__all__ = ["PruneStructure"]

Group = AttentionGroup | FFNGroup | ConvGroup


# ------------------------------------------------------------------------------ importance
def _consumer_weight(group: Group, tensors: dict) -> tuple[np.ndarray, int]:
    """The weight reading the pruned channels, and its input-channel axis (o_proj, down_proj, next conv)."""
    if isinstance(group, AttentionGroup):
        return tensors[group.o.weight].values, 0
    if isinstance(group, FFNGroup):
        return tensors[group.down.weight].values, 0
    return np.concatenate([tensors[f.weight].values for f in group.followers], axis=0), 1


def _channel_sq_norm(weight: np.ndarray, axis: int) -> np.ndarray:
    """Per input channel: squared L2 norm of everything the channel multiplies."""
    moved = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
    return np.einsum("ij,ij->i", moved, moved)


def _per_unit(values: np.ndarray, group: Group) -> np.ndarray:
    """Sum per-channel values into per-unit values (KV groups hold group_size × head_dim channels)."""
    return values.reshape(group.units, -1).sum(1)


def _magnitude(group: Group, tensors: dict, p: int) -> np.ndarray:
    """Lp norm (p = 1 or 2) of every weight slice a unit owns."""
    total = np.zeros(group.units)
    for name, axis, per_unit in group.coupled():
        values = np.moveaxis(tensors[name].values.astype(np.float64), axis, 0)
        values = values.reshape(group.units, -1)
        total += np.abs(values).sum(1) if p == 1 else (values**2).sum(1)
    return total if p == 1 else np.sqrt(total)


def _activation_score(group: Group, tensors: dict, moments, how: str) -> np.ndarray:
    """Wanda-style ‖X_c‖·‖W_c‖ or FLAP-style Var(X_c)·‖W_c‖² of the channels entering the next layer."""
    weight, axis = _consumer_weight(group, tensors)
    sq = _channel_sq_norm(weight, axis)
    if how == "activation":
        return _per_unit(moments.norm * np.sqrt(sq), group)
    return _per_unit(moments.var * sq, group)


def _user_score(group: Group, scores: dict) -> np.ndarray:
    if group.name not in scores:
        raise OptionError(f"'prune_structure': option 'scores' has no entry for '{group.name}' "
                          f"(keys are the weights reading the pruned channels: o_proj, down_proj, next conv)")
    values = np.asarray(scores[group.name], dtype=np.float64)
    if isinstance(group, AttentionGroup) and values.size == group.num_heads and group.group_size > 1:
        values = values.reshape(group.num_kv_heads, -1).sum(1)  # per query head → per KV group
    if values.size != group.units:
        raise OptionError(f"'prune_structure': scores['{group.name}'] has {values.size} entries, expected {group.units}")
    return values


def _allocate(scores: list[np.ndarray], counts: list[int], schedule: str) -> list[np.ndarray]:
    """Indices to remove per group: the `count` lowest of each (uniform), or the lowest of all
    groups' mean-normalised scores with the same total (global, at least one unit kept per group)."""
    if schedule == "uniform":
        return [np.sort(np.argsort(s, kind="stable")[:c]) for s, c in zip(scores, counts)]
    pool = [(float(v / (np.mean(s) or 1.0)), g, int(i)) for g, s in enumerate(scores) for i, v in enumerate(s)]
    pool.sort()
    removed: list[list[int]] = [[] for _ in scores]
    budget = sum(counts)
    for _, g, i in pool:
        if budget == 0:
            break
        if len(removed[g]) < len(scores[g]) - 1:
            removed[g].append(i)
            budget -= 1
    return [np.sort(np.asarray(r, dtype=np.int64)) for r in removed]


# ------------------------------------------------------------------------------ rewriting
def _unit_channels(removed: np.ndarray, width: int) -> np.ndarray:
    """Channel indices of removed units, each unit `width` channels wide."""
    return (removed[:, None] * width + np.arange(width)[None, :]).ravel()


def _slice(tensors: dict, name: str, axis: int, drop: np.ndarray) -> int:
    """Replace a constant by itself without `drop` along `axis`; returns elements removed."""
    const = tensors[name]
    before = const.values
    const.values = np.ascontiguousarray(np.delete(before, drop, axis=axis))  # new array: copy-on-write
    return int(before.size - const.values.size)


def _rewrite_shape(graph: gs.Graph, node: gs.Node, index: int, edits: dict[int, int], made: dict) -> None:
    """Give `node` a shape input with `edits` (position → value) applied, never touching shared tensors.

    `made` maps (original shape tensor, edits) to the rewritten tensor, so layers pruned alike share one
    (and (Concat piece, new values) to the rewritten piece, so Concats sharing a piece share its edit).
    """
    shape = node.inputs[index]
    key = (id(shape), tuple(sorted(edits.items())))
    if key not in made:
        tag = f"pruned_{'_'.join(f'{p}to{v}' for p, v in sorted(edits.items()))}"
        made[key] = _edited_shape(graph, shape, edits, tag, made)
    node.inputs[index] = made[key]


def _edited_shape(graph: gs.Graph, shape: gs.Tensor, edits: dict[int, int], tag: str, made: dict) -> gs.Tensor:
    if isinstance(shape, gs.Constant):
        values = np.array(shape.values, copy=True)
        for pos, value in edits.items():
            values[pos] = value
        return gs.Constant(f"{shape.name}__{tag}", values)
    concat = shape.inputs[0]
    pieces, offset = list(concat.inputs), 0
    for i, piece in enumerate(concat.inputs):
        length = piece.values.size if isinstance(piece, gs.Constant) else int(piece.shape[0])
        hits = {p - offset: v for p, v in edits.items() if offset <= p < offset + length}
        if hits:
            values = np.array(piece.values, copy=True).reshape(-1)
            for pos, value in hits.items():
                values[pos] = value
            key = (id(piece), tuple(values.tolist()))
            if key not in made:
                name = f"{piece.name}__pruned_{'_'.join(str(v) for v in values.tolist())}"
                made[key] = gs.Constant(name, values.reshape(piece.values.shape))
            pieces[i] = made[key]
        offset += length
    out = gs.Variable(f"{shape.name}__{tag}", dtype=shape.dtype, shape=shape.shape)
    graph.nodes.append(gs.Node("Concat", f"{concat.name}__{tag}", dict(concat.attrs), pieces, [out]))
    return out


def _forget_shapes(graph: gs.Graph, starts: list[gs.Tensor], stop: set[str]) -> None:
    """Drop stale static shapes from tensors downstream of sliced projections, up to `stop` nodes."""
    outputs = {id(t) for t in graph.outputs}
    seen, queue = set(), deque(starts)
    while queue:
        tensor = queue.popleft()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) not in outputs:
            tensor.shape = None
        for consumer in tensor.outputs:
            if consumer.name not in stop:
                queue.extend(consumer.outputs)


def _add_bias(graph: gs.Graph, tensors: dict, proj, delta: np.ndarray, tag: str) -> None:
    """Add `delta` to a projection's output: into its bias constant, or as a new Add of a constant."""
    delta = delta.astype(np.float32)
    if proj.bias:
        const = tensors[proj.bias]
        const.values = (const.values + delta.reshape(const.values.shape)).astype(const.values.dtype)
        return
    node = next(n for n in graph.nodes if n.name == proj.node)
    if node.op == "Conv":
        node.inputs.append(gs.Constant(f"{proj.weight}__bias_{tag}", delta))
        return
    out = node.outputs[0]
    added = gs.Variable(f"{out.name}__{tag}", dtype=out.dtype, shape=out.shape)
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = added
    graph.nodes.append(gs.Node("Add", f"{proj.node}__{tag}", {}, [out, gs.Constant(f"{proj.weight}__{tag}", delta)], [added]))


# ------------------------------------------------------------------------------------- pass
@register_pass
@dataclass(frozen=True)
class PruneStructure(Pass):
    """Remove attention heads (by KV group), FFN channels and conv output channels from an ONNX model.

    Reads the graph (`graphopt.analysis.pruning_graph.find_structures`), calibration feeds when importance
    is "activation"/"fluctuation" or `bias_compensation` is on, and `scores` when given. Rewrites:

    1. Attention (MHA and GQA): removing KV group g slices K/V columns g·d..(g+1)·d, the Q columns of
       its `group_size` query heads and the same rows of the output projection (and Q/K/V biases);
       every Reshape/Expand shape entry counting heads is rewritten (shared constants and Concats
       are cloned, never edited). `heads` is a count per layer (int) or a fraction of KV groups.
    2. FFN: removing channel j slices column j of every gate/up weight (and bias) and row j of down.
    3. Conv: removing output channel c slices the filter, its bias, the following BatchNorm's
       scale/bias/mean/var and input channel c of every Conv reading it.
    4. Importance per unit: "l1"/"l2" norm of all its weight slices; "activation" = Σ ‖X_c‖·‖W_c‖
       (Wanda-style) and "fluctuation" = Σ Var(X_c)·‖W_c‖² (FLAP) over the channels entering the next
       layer; "scores" = user values keyed by that next layer's weight name (a JSON file or mapping,
       e.g. from `graphopt.training.l0_gates`). `schedule`: "uniform" (same count per layer, `layer_ratios`
       overriding by group name) or "global" (lowest mean-normalised scores across layers).
    5. `bias_compensation`: the removed channels' mean calibration activation times their next-layer
       weights is added to that layer's bias (a new Add of a constant for bias-free MatMuls).
    6. Decoders: removing KV groups also shrinks the cache: the spec's kv_heads and heads, and dim 1
       of every `past_key_values.N.*` input and `present.N.*` output (`graphopt.ir.decoder.set_kv_heads`).
       Ort form: attention is one GroupQueryAttention per layer, whose `num_heads` / `kv_num_heads`
       are rewritten. Portable form: attention reads the cache and the new rows as two key blocks
       (Q·Kᵀ MatMuls joined on the key axis, probabilities sliced per block for V), queries grouped
       per KV head; its shape entries counting heads (the grouping Reshapes of Q, scores and
       probabilities, the heads' split and merge) are rewritten as in rule 1. Its prefill and decode
       graphs are specialised from the one pruned graph, so both lose the same groups. The spec has
       one kv_heads, so a pruning that keeps a different count in some layer is refused, and so is
       attention reading cache inputs that no decoder spec describes.
    Does NOT fire when every ratio is 0 (`changed` False, model untouched). Refuses (clear error
    naming the node) when asked to prune a kind the graph has none of, or to remove every unit.

    Guarantees: units whose weights are all zero are removed with outputs unchanged (within float
    rounding, < 1e-5 relative); graph inputs/outputs keep their names. Leaves one
    `model.meta.pruning` record per pruned group (kind, group, removed indices, before/after counts).
    """

    name: ClassVar[str] = "prune_structure"
    mutates_input: ClassVar[bool] = True

    heads: int | float = field(default=0, metadata={"help": "KV groups (MHA: heads) removed per layer: a count (int) or a fraction < 1"})
    ffn_ratio: float = field(default=0.0, metadata={"help": "fraction of FFN intermediate channels removed"})
    conv_ratio: float = field(default=0.0, metadata={"help": "fraction of conv output channels removed"})
    importance: Literal["l1", "l2", "activation", "fluctuation", "scores"] = field(
        default="l2", metadata={"help": "how units are ranked (activation/fluctuation need calibration)"})
    scores: str | dict[str, list[float]] = field(
        default="", metadata={"file": True, "help": "JSON file or mapping: next-layer weight name -> one score per unit"})
    schedule: Literal["uniform", "global"] = field(default="uniform", metadata={"help": "per-layer or global ranking"})
    layer_ratios: dict[str, float] = field(default_factory=dict, metadata={"help": "group name -> ratio override"})
    bias_compensation: bool = field(default=False, metadata={"help": "keep removed units' mean contribution as a bias"})

    def check(self) -> None:
        for option in ("ffn_ratio", "conv_ratio"):
            value = getattr(self, option)
            if not 0.0 <= value < 1.0:
                raise OptionError(f"'prune_structure': option '{option}' must be in [0, 1), got {value}")
        if isinstance(self.heads, float) and not 0.0 <= self.heads < 1.0:
            raise OptionError(f"'prune_structure': option 'heads' as a fraction must be in [0, 1), got {self.heads}")
        if isinstance(self.heads, int) and self.heads < 0:
            raise OptionError(f"'prune_structure': option 'heads' must be >= 0, got {self.heads}")
        for key, value in self.layer_ratios.items():
            if not 0.0 <= value < 1.0:
                raise OptionError(f"'prune_structure': layer_ratios['{key}'] must be in [0, 1), got {value}")
        if self.importance == "scores" and not self.scores:
            raise OptionError("'prune_structure': importance 'scores' needs option 'scores' (a JSON file or mapping)")
        if isinstance(self.scores, dict):
            _checked_scores(self.scores, "'prune_structure': option 'scores'")

    # ---------------------------------------------------------------- planning
    def _count(self, group: Group) -> int:
        if group.name in self.layer_ratios:
            return int(round(self.layer_ratios[group.name] * group.units))
        if isinstance(group, AttentionGroup):
            return self.heads if isinstance(self.heads, int) else int(round(self.heads * group.units))
        ratio = self.ffn_ratio if isinstance(group, FFNGroup) else self.conv_ratio
        return int(round(ratio * group.units))

    def _selected(self, found: StructureMap) -> list[tuple[str, list[Group]]]:
        asked = [("attention", found.attention, self.heads != 0), ("ffn", found.ffn, self.ffn_ratio > 0),
                 ("conv", found.conv, self.conv_ratio > 0)]
        chosen = []
        for kind, groups, wanted in asked:
            wanted = wanted or any(g.name in self.layer_ratios for g in groups)
            if wanted and not groups:
                why = "; ".join(found.unmatched[:3]) or "no Softmax/FFN/Conv pattern in the graph"
                raise UnsupportedGraphError(f"prune_structure: asked to prune {kind} but none matched: {why}")
            if wanted:
                chosen.append((kind, groups))
        known = {g.name for g in found.attention + found.ffn + found.conv}
        unknown = sorted(set(self.layer_ratios) - known)
        if unknown:
            raise OptionError(f"'prune_structure': layer_ratios names '{unknown[0]}', which is no prunable group")
        return chosen

    def _scores(self, groups: list[Group], tensors: dict, moments: dict) -> list[np.ndarray]:
        if self.importance in ("l1", "l2"):
            return [_magnitude(g, tensors, 1 if self.importance == "l1" else 2) for g in groups]
        if self.importance == "scores":
            table = self.scores if isinstance(self.scores, dict) else _read_scores(self.scores)
            return [_user_score(g, table) for g in groups]
        return [_activation_score(g, tensors, moments[g.name], self.importance) for g in groups]

    # ---------------------------------------------------------------- running
    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        spec = DecoderSpec.of(model)
        found = find_structures(model)
        chosen = self._selected(found)
        plan = [(kind, g, self._count(g)) for kind, groups in chosen for g in groups]
        for kind, g, count in plan:
            if count >= g.units:
                raise OptionError(f"'prune_structure': removing {count} of {g.units} {kind} units of '{g.name}' "
                                  "would remove all of them; keep at least one")
        plan = [(kind, g, c) for kind, g, c in plan if c > 0]
        if not plan:
            return PassResult(model, False, {"matched": found.summary()})
        graph, tensors = model.graph, model.graph.tensors()
        moments = {}
        if self.importance in ("activation", "fluctuation") or self.bias_compensation:
            moments = _capture_moments(model, [g for _, g, _ in plan], ctx.require_calib(self.name), ctx.progress)
        removed_by_group = []
        for kind in ("attention", "ffn", "conv"):
            part = [(g, c) for k, g, c in plan if k == kind]
            if part:
                scores = self._scores([g for g, _ in part], tensors, moments)
                removed_by_group += zip([g for g, _ in part], _allocate(scores, [c for _, c in part], self.schedule), scores)
        cache_heads = _decoder_cache_heads(spec, removed_by_group)
        stats: Counter = Counter()
        shapes_made: dict = {}
        for group, removed, scores in removed_by_group:
            if removed.size == 0:
                continue
            stats["params_removed"] += self._apply(graph, tensors, group, removed, moments.get(group.name), shapes_made)
            record = {"pass": self.name, "kind": type(group).__name__.replace("Group", "").lower(), "group": group.name,
                      "removed": removed.tolist(), "before": group.units, "after": group.units - removed.size,
                      "importance": self.importance, "bias_compensation": self.bias_compensation,
                      "removed_scores": [float(scores[i]) for i in removed]}
            model.meta.pruning.append(record)
            if isinstance(group, AttentionGroup):
                stats["kv_groups_removed"] += removed.size
                stats["heads_removed"] += removed.size * group.group_size
            elif isinstance(group, FFNGroup):
                stats["ffn_channels_removed"] += removed.size
            else:
                stats["conv_channels_removed"] += removed.size
            stats["groups_pruned"] += 1
        if cache_heads is not None:
            stats["decoder_kv_heads"] = set_kv_heads(model, cache_heads).kv_heads
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        changed = stats["groups_pruned"] > 0
        return PassResult(model, changed, {**dict(stats), "matched": found.summary(), "unmatched": found.unmatched[:10]})

    def _apply(self, graph: gs.Graph, tensors: dict, group: Group, removed: np.ndarray, moments, shapes_made: dict) -> int:
        """Slice every coupled tensor of one group, rewrite its shapes, compensate; returns params removed."""
        nodes = {n.name: n for n in graph.nodes}
        compensation, read_cache = [], []
        if self.bias_compensation and moments is not None:
            compensation = _compensation(group, tensors, removed, moments)  # before the rows are sliced away
        total = 0
        for name, axis, width in group.coupled():
            total += _slice(tensors, name, axis, _unit_channels(removed, width))
        if isinstance(group, AttentionGroup):
            kv = group.num_kv_heads - removed.size
            new = {"kv_heads": kv, "q_heads": kv * group.group_size, "q_width": kv * group.group_size * group.head_dim}
            edits: dict[tuple[str, int], dict[int, int]] = {}
            for site in group.shape_sites:
                edits.setdefault((site.node, site.input_index), {})[site.position] = new[site.kind]
            for (node_name, index), change in edits.items():
                _rewrite_shape(graph, nodes[node_name], index, change, shapes_made)
            if group.kernel:
                nodes[group.kernel].attrs.update(num_heads=new["q_heads"], kv_num_heads=kv)
            starts, stop = [group.q, group.k, group.v], {group.o.node}
            read_cache = [t for name in group.cache for reader in tensors[name].outputs for t in reader.outputs]
        elif isinstance(group, FFNGroup):
            starts, stop = group.inputs, {group.down.node}
        else:
            bn = nodes.get(group.batch_norm) if group.batch_norm else None
            for t in (bn.inputs[1:] if bn else []):
                total += _slice(tensors, t.name, 0, removed)
            starts, stop = [group.conv], {f.node for f in group.followers}
        outputs = [tensors[p.output] for p in starts] + [nodes[p.node].outputs[0] for p in starts]
        _forget_shapes(graph, outputs + read_cache, stop)
        for proj, delta in compensation:
            _add_bias(graph, tensors, proj, delta, "prune_bias")
        return total


def _decoder_cache_heads(spec: DecoderSpec | None, removed_by_group: list) -> list[np.ndarray] | None:
    """The KV heads removed from each layer of a decoder, in layer order (None: no decoder, or no KV
    group removed). Refuses removals that differ in count between layers (the cache has one kv_heads),
    attention reading a cache no spec describes, and attention that does not read one layer's past."""
    pruned = [(g, r) for g, r, _ in removed_by_group if isinstance(g, AttentionGroup) and r.size]
    cached = next((g for g, _ in pruned if g.cache), None)
    if spec is None and cached is not None:
        what = f"GroupQueryAttention '{cached.kernel}'" if cached.kernel else f"attention '{cached.name}'"
        raise UnsupportedGraphError(
            f"prune_structure: {what} reads a KV cache ({', '.join(cached.cache)}) whose inputs and outputs this "
            "model does not describe (no decoder spec); build the model as a decoder (graphopt.load(..., decoder=...))")
    if spec is None or not pruned:
        return None
    layer_of = {name: i // 2 for i, name in enumerate(spec.past_names)}
    by_layer = {}
    for g, r in pruned:
        layers = {layer_of.get(name) for name in g.cache}
        if len(g.cache) != 2 or len(layers) != 1 or None in layers:
            raise UnsupportedGraphError(
                f"prune_structure: attention '{g.name}' reads {list(g.cache)} as its cache, not one layer's "
                "past key and value (past_key_values.N.key/value); its cache could not shrink with it")
        by_layer[layers.pop()] = r
    kept = sorted({g.num_kv_heads - r.size for g, r in pruned})
    if len(pruned) != spec.layers or len(by_layer) != spec.layers or len(kept) != 1:
        raise UnsupportedGraphError(
            f"prune_structure: a decoder's cache has one kv_heads for every layer, but this pruning keeps {kept} "
            f"KV groups in {len(pruned)} of its {spec.layers} layers; remove the same count from every layer "
            "(schedule 'uniform', no layer_ratios on attention)")
    return [by_layer[layer] for layer in range(spec.layers)]


def _compensation(group: Group, tensors: dict, removed: np.ndarray, moments) -> list[tuple]:
    """(projection, bias delta): the removed channels' mean activation through the next layer's weights."""
    if isinstance(group, ConvGroup):
        mean = moments.mean[removed]
        return [(f, np.einsum("c,ocij->o", mean, tensors[f.weight].values[:, removed].astype(np.float64)))
                for f in group.followers]
    nxt = group.o if isinstance(group, AttentionGroup) else group.down
    width = group.group_size * group.head_dim if isinstance(group, AttentionGroup) else 1
    channels = _unit_channels(removed, width)
    return [(nxt, moments.mean[channels] @ tensors[nxt.weight].values[channels].astype(np.float64))]


MAX_SCORES_BYTES = 64 << 20  # one score per head / channel of every layer: a few MB at most


def _read_scores(path: str) -> dict:
    """A scores JSON file (resolved by the recipe against its folder), size-bounded and checked."""
    def error(message: str) -> OptionError:
        return OptionError(f"'prune_structure': option 'scores': {message}")

    data = read_json(path, max_bytes=MAX_SCORES_BYTES, error=error, what="scores file")
    return _checked_scores(data, f"'prune_structure': option 'scores': {path}")


def _checked_scores(table, where: str) -> dict:
    """`table` if it maps weight names to lists of finite numbers; OptionError naming the entry if not."""
    want_dict(table, f"{where} (weight name -> scores)", OptionError)
    for name, values in table.items():
        for i, value in enumerate(want_list(values, f"{where}, entry '{name}'", OptionError)):
            want_number(value, f"{where}, entry '{name}', score {i}", OptionError)
    return table


def _capture_moments(model: Model, groups: list[Group], calib, progress: bool) -> dict:
    """Per group: channel moments of the activation entering the layer that reads the pruned channels."""
    nodes = {n.name: n for n in model.graph.nodes}
    wanted = {}
    for g in groups:
        reader = g.o if isinstance(g, AttentionGroup) else g.down if isinstance(g, FFNGroup) else g.followers[0]
        wanted[g.name] = (nodes[reader.node].inputs[0].name, isinstance(g, ConvGroup))
    axis_of = {tensor: (1 if conv else -1) for tensor, conv in wanted.values()}
    acc = capture(model, calib, list(axis_of), lambda name: ChannelMoments(axis_of[name]),
                              progress=progress, desc="prune_structure: calibrating")
    return {name: acc[tensor] for name, (tensor, _) in wanted.items()}
