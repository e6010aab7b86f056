"""fuse_ort_ops: residual Adds and RMSNorms as onnxruntime's fused norm, linears that share an input as one kernel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model, consumers
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass

__all__ = ["FuseOrtOps"]

MS = "com.microsoft"


def _scalar(tensor: gs.Tensor) -> float | None:
    """The value of a one-element float constant, else None."""
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    return float(values.reshape(-1)[0]) if values.size == 1 and values.dtype.kind == "f" else None


def _only_user(tensor: gs.Tensor, users: dict, op: str, outputs: set[str]) -> gs.Node | None:
    """The single node of type `op` reading `tensor`, when nothing else reads it and it is no graph output."""
    readers = users.get(id(tensor), [])
    if len(readers) != 1 or readers[0].op != op or tensor.name in outputs:
        return None
    return readers[0]


def _other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The input of a two-input node that is not `tensor` (None unless `tensor` is one of its two inputs)."""
    if len(node.inputs) != 2 or tensor not in node.inputs:
        return None
    first, second = node.inputs
    return second if first is tensor else first


def _reduces_last_axis(node: gs.Node, rank: int | None) -> bool:
    if node.attrs.get("keepdims", 1) != 1:
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = np.asarray(node.inputs[1].values).reshape(-1).tolist()
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or rank is not None and axes[0] == rank - 1


@dataclass
class _Norm:
    """One RMSNorm found in the graph: x · 1/sqrt(mean(x²) + eps) [· gain]."""

    x: gs.Tensor
    epsilon: float
    gain: np.ndarray
    out: gs.Tensor
    nodes: list[gs.Node]


def _match_norm(pow_node: gs.Node, users: dict, outputs: set[str]) -> _Norm | None:
    """The RMSNorm starting at Pow(x, 2): ReduceMean over the last axis (keepdims), Add(eps), Sqrt,
    Reciprocal, Mul by x, then an optional Mul by a constant gain vector; every intermediate read
    only by the next node."""
    if len(pow_node.inputs) != 2 or _scalar(pow_node.inputs[1]) != 2.0:
        return None
    x = pow_node.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    mean = _only_user(pow_node.outputs[0], users, "ReduceMean", outputs)
    if mean is None or not _reduces_last_axis(mean, rank):
        return None
    add = _only_user(mean.outputs[0], users, "Add", outputs)
    epsilon = _scalar(_other(add, mean.outputs[0])) if add is not None else None
    sqrt = _only_user(add.outputs[0], users, "Sqrt", outputs) if epsilon is not None else None
    recip = _only_user(sqrt.outputs[0], users, "Reciprocal", outputs) if sqrt is not None else None
    scale = _only_user(recip.outputs[0], users, "Mul", outputs) if recip is not None else None
    if scale is None or _other(scale, recip.outputs[0]) is not x:
        return None
    nodes, out = [pow_node, mean, add, sqrt, recip, scale], scale.outputs[0]
    hidden = x.shape[-1] if rank and isinstance(x.shape[-1], int) else None
    gain = None
    readers = users.get(id(out), [])
    if len(readers) == 1 and readers[0].op == "Mul" and out.name not in outputs:
        weight = _other(readers[0], out)
        values = np.asarray(weight.values) if isinstance(weight, gs.Constant) else None
        if values is not None and values.dtype == np.float32 and values.ndim == 1 and values.size > 1:
            gain, out = values, readers[0].outputs[0]
            nodes.append(readers[0])
    if gain is None:
        if hidden is None:
            return None
        gain = np.ones(hidden, np.float32)
    if hidden is not None and gain.size != hidden:
        return None
    return _Norm(x, epsilon, gain, out, nodes)


def _skip_add(x: gs.Tensor, rank: int | None) -> gs.Node | None:
    """The Add making `x` from two computed tensors of x's rank (a residual sum), else None."""
    add = x.inputs[0] if len(x.inputs) == 1 else None
    if add is None or add.op != "Add" or any(isinstance(t, gs.Constant) or t.shape is None for t in add.inputs):
        return None
    return add if rank and all(len(t.shape) == rank for t in add.inputs) and rank in (2, 3) else None


# --------------------------------------------------------------------------- packing
_PACKABLE = ("MatMulNBits", "MatMulIntegerToFloat", "MatMul")


def _pack_key(node: gs.Node) -> tuple | None:
    """What linears must share to run as one kernel: input, kind and, per kind, the attributes and the
    activation encoding; None for a node with a computed weight or inputs no rule here packs."""
    if node.op not in _PACKABLE or len(node.outputs) != 1:
        return None
    if node.op == "MatMulNBits":
        if node.domain != MS or len(node.inputs) > 4 or not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
            return None
        attrs = tuple(node.attrs.get(a) for a in ("K", "bits", "block_size", "accuracy_level"))
        return (node.op, id(node.inputs[0]), attrs, len(node.inputs))
    if node.op == "MatMulIntegerToFloat":
        if node.domain != MS or len(node.inputs) != 6 or not isinstance(node.inputs[1], gs.Constant):
            return None
        if not all(isinstance(node.inputs[i], gs.Constant) for i in (3, 5)):
            return None
        weight = node.inputs[1].values
        return (node.op, *(id(node.inputs[i]) for i in (0, 2, 4)), weight.shape[0], weight.dtype.name)
    weight = node.inputs[1] if len(node.inputs) == 2 else None
    if not isinstance(weight, gs.Constant) or weight.values.ndim != 2 or weight.values.dtype != np.float32:
        return None
    return (node.op, id(node.inputs[0]), weight.values.shape[0])


def _width(node: gs.Node) -> int:
    return int(node.attrs["N"]) if node.op == "MatMulNBits" else int(node.inputs[1].values.shape[1])


def _packed_node(group: list[gs.Node], output: gs.Variable) -> gs.Node:
    """One node computing the group's outputs side by side along the last axis, from the same numbers."""
    first, name = group[0], f"{group[0].name}_packed"
    widths = [_width(n) for n in group]

    def joined(index: int, axis: int, per_column: bool = False) -> gs.Constant:
        parts = [np.asarray(n.inputs[index].values) for n in group]
        if per_column:  # scalars (per tensor) repeat over their node's columns
            parts = [np.broadcast_to(p.reshape(-1), (w,)) if p.size == 1 else p.reshape(-1)
                     for p, w in zip(parts, widths)]
        return gs.Constant(f"{name}_{index}", np.ascontiguousarray(np.concatenate(parts, axis=axis)))

    if first.op == "MatMulNBits":  # B [N, blocks, blob], scales [N, blocks], zero points [N, bytes]: rows are columns
        inputs = [first.inputs[0], *(joined(i, 0) for i in range(1, len(first.inputs)))]
        return gs.Node(first.op, name=name, domain=MS, inputs=inputs, outputs=[output],
                       attrs={**first.attrs, "N": sum(widths)})
    if first.op == "MatMulIntegerToFloat":
        x, _, x_scale, _, x_zero, _ = first.inputs
        inputs = [x, joined(1, 1), x_scale, joined(3, 0, True), x_zero, joined(5, 0, True)]
        return gs.Node(first.op, name=name, domain=MS, inputs=inputs, outputs=[output])
    return gs.Node("MatMul", name=name, inputs=[first.inputs[0], joined(1, 1)], outputs=[output])


def _feeds_gqa_in_order(tensors: list[gs.Tensor], users: dict, outputs: set[str]) -> gs.Node | None:
    """The GroupQueryAttention whose query, key and value are exactly these three tensors, in that
    order, and read by nothing else: it can take them packed (its query input, key/value empty)."""
    if len(tensors) != 3:
        return None
    readers = [users.get(id(t), []) for t in tensors]
    if any(len(r) != 1 or t.name in outputs for r, t in zip(readers, tensors)):
        return None
    gqa = readers[0][0]
    if gqa.op != "GroupQueryAttention" or any(r[0] is not gqa for r in readers):
        return None
    return gqa if list(gqa.inputs[:3]) == list(tensors) else None


def _split_partner(split: gs.Node, users: dict, outputs: set[str]) -> tuple[gs.Node, list[gs.Node]] | None:
    """(the other Split, the Adds) when each output i of `split` is read only by an Add whose other
    input is output i of another Split of the same sizes and axis, itself read only by that Add."""
    adds = [users.get(id(t), []) for t in split.outputs]
    if any(len(a) != 1 or a[0].op != "Add" or t.name in outputs for a, t in zip(adds, split.outputs)):
        return None
    adds = [a[0] for a in adds]
    others = [_other(add, t) for add, t in zip(adds, split.outputs)]
    if any(o is None or len(o.inputs) != 1 for o in others):
        return None
    partner = others[0].inputs[0]
    if partner is split or partner.op != "Split" or list(partner.outputs) != others or len(partner.inputs) != 2 \
            or not isinstance(partner.inputs[1], gs.Constant) or partner.attrs.get("axis") != split.attrs.get("axis") \
            or not np.array_equal(partner.inputs[1].values, split.inputs[1].values):
        return None
    if any(len(users.get(id(o), [])) != 1 or o.name in outputs for o in others):
        return None
    return partner, adds


@register_pass
@dataclass(frozen=True)
class FuseOrtOps(Pass):
    """Fuse what onnxruntime's CPU runs as single kernels but does not find by itself.

    Reads the ONNX graph (float, or after `use_ort_kernels`); no calibration. Rules:
    1. `norms`: an RMSNorm decomposed as the exporters write it (Pow(x, 2) -> ReduceMean over the
       last axis -> Add(eps) -> Sqrt -> Reciprocal -> Mul by x, then an optional Mul by a constant
       gain vector, each intermediate read only by the next) of a residual sum x = Add(a, b) (two
       computed tensors of rank 2 or 3) becomes, with that Add, one com.microsoft
       SkipSimplifiedLayerNormalization(a, b, gain; ones where there is no gain Mul) whose fourth
       output is the sum for x's other readers. A norm of anything else (the embedding's) stays:
       its fused op, SimplifiedLayerNormalization, lives in onnxruntime's copy of the ONNX domain,
       which the ONNX checker rejects.
    2. `pack`: linears reading the same tensor with constant weights of the same kind
       (MatMulNBits with equal K, bits, block size and accuracy level; MatMulIntegerToFloat with
       the same activation codes and encoding; float MatMul) become one node whose weights are
       theirs side by side along N, and a Split gives each reader its columns; when the pack is
       a GroupQueryAttention's query, key and value in that order, the attention reads the packed
       tensor as its query and the Split is not written. Then, where every output of one such Split
       is added to the same output of another of the same sizes (a packed linear and its packed
       offset correction, `quantize: weight_offset`), the two packed tensors are added once before
       a single Split (or go straight into the attention, as above).
    Does NOT fire on: norms not of a residual sum, norms with another consumer in the middle, a non-constant epsilon or gain, a
    gain of the wrong size, or an unknown hidden size without a gain; linears with computed
    weights or bias / group-index inputs. `changed` is False when nothing matched.

    Guarantees: the same function of the inputs, up to float rounding in the fused norm (no
    weight code, scale or zero point changes; columns keep their values and order).
    """

    name: ClassVar[str] = "fuse_ort_ops"
    mutates_input: ClassVar[bool] = True

    norms: bool = field(default=True, metadata={
        "help": "residual Add + RMSNorm -> SkipSimplifiedLayerNormalization"})
    pack: bool = field(default=True, metadata={
        "help": "linears sharing an input -> one kernel (q/k/v packed into GroupQueryAttention's query)"})

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        stats = {"SkipSimplifiedLayerNormalization": 0, "packed": 0,
                 "packed_into_attention": 0, "adds_before_split": 0}
        if self.norms:
            self._fuse_norms(graph, stats)
        if self.pack:
            self._pack(graph, stats)
        if not any(stats.values()):
            return PassResult(model, False, {"reason": "no RMSNorm to fuse and no linears sharing an input"})
        if any(n.domain == MS for n in graph.nodes):
            import onnx

            if MS not in {d.domain for d in graph.import_domains or []}:
                graph.import_domains = [*(graph.import_domains or []), onnx.helper.make_opsetid(MS, 1)]
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(model, True, stats)

    def _fuse_norms(self, graph: gs.Graph, stats: dict) -> None:
        outputs = {t.name for t in graph.outputs}
        for pow_node in [n for n in graph.nodes if n.op == "Pow"]:
            users = consumers(graph)
            if not pow_node.outputs:
                continue
            norm = _match_norm(pow_node, users, outputs)
            add = _skip_add(norm.x, len(norm.x.shape)) if norm is not None and norm.x.shape is not None else None
            if add is None:
                continue
            x, out, base = norm.x, norm.out, pow_node.name
            gain = gs.Constant(f"{base}_rms_gain", norm.gain.astype(np.float32))
            for node in norm.nodes:
                node.outputs.clear()
                node.inputs.clear()
            first, second = add.inputs
            add.inputs.clear()
            add.outputs.clear()
            graph.nodes.append(gs.Node(
                "SkipSimplifiedLayerNormalization", name=f"{base}_skip_rms", domain=MS,
                inputs=[first, second, gain], outputs=[out, gs.Variable.empty(), gs.Variable.empty(), x],
                attrs={"epsilon": norm.epsilon}))
            stats["SkipSimplifiedLayerNormalization"] += 1

    def _pack(self, graph: gs.Graph, stats: dict) -> None:
        groups: dict[tuple, list[gs.Node]] = {}
        for node in graph.nodes:
            key = _pack_key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
        users, outputs = consumers(graph), {t.name for t in graph.outputs}
        for group in [g for g in groups.values() if len(g) > 1]:
            gqa = _feeds_gqa_in_order([n.outputs[0] for n in group], users, outputs)
            packed = gs.Variable(f"{group[0].name}_packed_out", dtype=np.float32)
            graph.nodes.append(_packed_node(group, packed))
            if gqa is not None:
                for index, tensor in enumerate([packed, gs.Variable.empty(), gs.Variable.empty()]):
                    gqa.inputs[index] = tensor
                stats["packed_into_attention"] += 1
            else:
                sizes = gs.Constant(f"{group[0].name}_packed_split", np.array([_width(n) for n in group], np.int64))
                graph.nodes.append(gs.Node("Split", name=f"{group[0].name}_packed_split", inputs=[packed, sizes],
                                           outputs=[n.outputs[0] for n in group], attrs={"axis": -1}))
            for node in group:
                node.outputs.clear()
                node.inputs.clear()
            stats["packed"] += 1
        self._add_before_split(graph, stats)

    def _add_before_split(self, graph: gs.Graph, stats: dict) -> None:
        """Add(Split(a)[i], Split(b)[i]) for every i -> Split(Add(a, b)): a packed linear's offset
        correction (`quantize: weight_offset`, packed the same way) added once, before the split."""
        for split in [n for n in graph.nodes if n.op == "Split" and len(n.inputs) == 2]:
            users, outputs = consumers(graph), {t.name for t in graph.outputs}
            if not split.outputs or not isinstance(split.inputs[1], gs.Constant):
                continue
            found = _split_partner(split, users, outputs)
            if found is None:
                continue
            partner, adds = found
            total = gs.Variable(f"{split.name}_sum", dtype=np.float32)
            graph.nodes.append(gs.Node("Add", name=f"{split.name}_add", inputs=[split.inputs[0], partner.inputs[0]],
                                       outputs=[total]))
            results = [add.outputs[0] for add in adds]
            gqa = _feeds_gqa_in_order(results, users, outputs)
            if gqa is not None:
                for index, tensor in enumerate([total, gs.Variable.empty(), gs.Variable.empty()]):
                    gqa.inputs[index] = tensor
                stats["packed_into_attention"] += 1
            else:
                graph.nodes.append(gs.Node("Split", name=f"{split.name}_of_sum", inputs=[total, split.inputs[1]],
                                           outputs=results, attrs=dict(split.attrs)))
            for node in [split, partner, *adds]:
                node.outputs.clear()
                node.inputs.clear()
            stats["adds_before_split"] += 1
