"""The pruning dependency graph: which weights and shape constants are coupled, found in the ONNX graph.

Structural pruning removes a unit (a KV group of attention heads, an FFN channel, a conv output
channel) from every tensor that carries it at once. This module finds those units by walking the
graph, not by parameter names:

- attention: Softmax ← scores MatMul(Q, Kᵀ) and MatMul(probs, V); each of Q, K, V is traced back
  (through Reshape to heads, Transpose, RoPE, GQA Unsqueeze/Expand/Reshape) to one projection, the
  output is traced forward (Transpose, Reshape merging heads) to the output projection. Keys may
  come in blocks (a portable decoder's cache and new rows): one scores MatMul per block joined by a
  Concat on the key axis, one MatMul(probs slice, V) per block summed by Adds; exactly one block
  reads the K/V projections, the others read graph inputs (the cache, recorded in `cache`);
- fused attention (a decoder's `com.microsoft:GroupQueryAttention`): its query, key and value inputs
  are the q/k/v projections' outputs, its past key/value inputs the cache, its first output feeds
  the output projection, and its `num_heads` / `kv_num_heads` attributes count the heads;
- FFN: a projection whose input is an elementwise function (SiLU·up, GELU, ReLU) of one or more
  projections of equal width (gate/up → down);
- conv chains: Conv → [BatchNormalization] → [unary activation] → Conv(s) reading its channels.

What cannot be matched is listed in `StructureMap.unmatched` with the node and the reason.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model

__all__ = [
    "Projection", "ShapeSite", "AttentionGroup", "FFNGroup", "ConvGroup", "StructureMap",
    "dependency_graph", "find_structures", "shape_entries",
]

# Ops a channel passes through unchanged, one value per channel in and out.
ELEMENTWISE = {
    "Mul", "Add", "Sub", "Div", "Sigmoid", "Relu", "Gelu", "Tanh", "Erf", "Softplus", "HardSigmoid",
    "HardSwish", "LeakyRelu", "Elu", "Selu", "Clip", "Neg", "Cast", "Identity", "Pow", "Sqrt", "Exp",
}
UNARY_ACTIVATIONS = {"Relu", "Clip", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Gelu", "Elu", "Identity"}
# Ops between a Q/K/V projection and the attention MatMuls that only move heads and positions around.
HEAD_LAYOUT = {"Reshape", "Transpose", "Unsqueeze", "Expand", "Mul", "Add", "Div", "Slice", "Neg", "Concat", "Squeeze", "Cast",
               "Split", "Sub"}
SHAPE_OPS = ("Reshape", "Expand")
# Ops between the scores MatMul(s) and the Softmax, and between the Softmax and the MatMul(s) with V.
SCORES_PATH = {"Add", "Mul", "Div", "Where", "Sub", "Cast", "Reshape"}
PROBS_PATH = {"Where", "IsNaN", "Cast", "Dropout", "Identity", "Reshape", "Slice"}
CACHE_READ = {"Transpose", "Cast", "Identity"}  # how a cache input may reach the attention MatMuls


@dataclass(frozen=True)
class Projection:
    """A linear layer y = x @ W (+ b): the MatMul/Gemm/Conv node, its weight, an optional bias.

    `bias_node` is the Add carrying `bias` (None when the bias is an input of the node itself, as
    for Conv/Gemm, or when there is none). `output` is the tensor after the bias.
    """

    node: str
    weight: str
    bias: str | None
    bias_node: str | None
    output: str


@dataclass(frozen=True)
class ShapeSite:
    """One entry of a Reshape/Expand shape that counts heads: `kind` says which count.

    kind: "q_heads", "kv_heads" or "q_width" (q_heads × head_dim); `node` reads the shape at `input_index`.
    """

    node: str
    input_index: int
    position: int
    kind: str


@dataclass
class AttentionGroup:
    """One attention block: q/k/v/o projections and the shape entries that count heads.

    Query head h belongs to KV group h // (num_heads // num_kv_heads) (HF `repeat_kv` order).
    MHA is the case num_kv_heads == num_heads: every group is one head. `kernel` names the fused
    attention node (GroupQueryAttention) whose `num_heads` / `kv_num_heads` attributes count the
    heads, when attention is one such node rather than MatMuls around a Softmax. `cache` names the
    graph inputs read as past keys and values ([batch, kv_heads, positions, head_dim]): they lose
    the removed groups too, which only the model's signature can record.
    """

    name: str
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    num_kv_heads: int
    head_dim: int
    shape_sites: list[ShapeSite] = field(default_factory=list)
    kernel: str | None = None
    cache: tuple[str, ...] = ()

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def units(self) -> int:
        return self.num_kv_heads

    def coupled(self) -> list[tuple[str, int, int]]:
        """(tensor, axis, elements per KV group) for every tensor that loses a slice with a KV group."""
        q_width = self.group_size * self.head_dim
        out = [(self.q.weight, 1, q_width), (self.k.weight, 1, self.head_dim), (self.v.weight, 1, self.head_dim),
               (self.o.weight, 0, q_width)]
        for proj, width in ((self.q, q_width), (self.k, self.head_dim), (self.v, self.head_dim)):
            if proj.bias:
                out.append((proj.bias, 0, width))
        return out


@dataclass
class FFNGroup:
    """Gate/up projections (one or more, equal width) feeding a down projection through elementwise ops."""

    name: str
    inputs: list[Projection]
    down: Projection
    width: int

    @property
    def units(self) -> int:
        return self.width

    def coupled(self) -> list[tuple[str, int, int]]:
        out = [(p.weight, 1, 1) for p in self.inputs] + [(p.bias, 0, 1) for p in self.inputs if p.bias]
        return out + [(self.down.weight, 0, 1)]


@dataclass
class ConvGroup:
    """A Conv whose output channels feed only Conv inputs, through an optional BatchNorm and activation."""

    name: str
    conv: Projection
    batch_norm: str | None
    followers: list[Projection]
    channels: int

    @property
    def units(self) -> int:
        return self.channels

    def coupled(self) -> list[tuple[str, int, int]]:
        out = [(self.conv.weight, 0, 1)] + ([(self.conv.bias, 0, 1)] if self.conv.bias else [])
        return out + [(f.weight, 1, 1) for f in self.followers]


@dataclass
class StructureMap:
    """Everything prunable in a graph, plus what looked prunable but could not be matched (with why)."""

    attention: list[AttentionGroup] = field(default_factory=list)
    ffn: list[FFNGroup] = field(default_factory=list)
    conv: list[ConvGroup] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"attention": len(self.attention), "ffn": len(self.ffn), "conv": len(self.conv),
                "unmatched": len(self.unmatched)}


# ----------------------------------------------------------------------------- graph helpers
def dependency_graph(graph: gs.Graph) -> nx.DiGraph:
    """Node-level data-flow graph: an edge u → v labelled with the tensor v reads from u."""
    dg = nx.DiGraph()
    for node in graph.nodes:
        dg.add_node(node.name, op=node.op)
        for tensor in node.inputs:
            for producer in tensor.inputs:
                dg.add_edge(producer.name, node.name, tensor=tensor.name)
    return dg


def _const(tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def _producer(tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _weight_of(node: gs.Node) -> gs.Constant | None:
    """The constant weight of a linear node (MatMul [in,out], Gemm, Conv), or None."""
    if node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if _const(x) or not _const(w) or w.values.ndim < 2:
        return None
    if node.op == "MatMul" and w.values.ndim != 2:
        return None
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("transB", 0)):
        return None  # [out,in] Gemm weights: not handled, reported as unmatched by callers
    if node.op == "Conv" and node.attrs.get("group", 1) != 1:
        return None
    return w


def _projection(node: gs.Node) -> Projection | None:
    """The Projection a linear node forms with a following bias Add, if any."""
    w = _weight_of(node)
    if w is None:
        return None
    out = node.outputs[0]
    if node.op in ("Conv", "Gemm"):
        bias = node.inputs[2] if len(node.inputs) > 2 and _const(node.inputs[2]) else None
        return Projection(node.name, w.name, bias.name if bias is not None else None, None, out.name)
    width = w.values.shape[1]
    if len(out.outputs) == 1 and out.outputs[0].op == "Add":
        add = out.outputs[0]
        other = [t for t in add.inputs if t is not out]
        if len(other) == 1 and _const(other[0]) and other[0].values.shape == (width,):
            return Projection(node.name, w.name, other[0].name, add.name, add.outputs[0].name)
    return Projection(node.name, w.name, None, None, out.name)


def _width(model_graph_tensors: dict, proj: Projection, axis: int = 1) -> int:
    return int(model_graph_tensors[proj.weight].values.shape[axis])


def _trace_back(start: gs.Tensor, allowed: set[str], limit: int = 40):
    """Walk producers from `start` through `allowed` ops to linear nodes.

    Returns (projection nodes reached, nodes walked, the first disallowed node or None).
    Reshape/Expand/Slice/Unsqueeze/Squeeze are followed through their data input only.
    """
    found, walked, blocked = [], [], None
    seen, queue = set(), deque([start])
    while queue and len(walked) < limit:
        tensor = queue.popleft()
        node = _producer(tensor)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if _weight_of(node) is not None:
            found.append(node)
            continue
        if node.op not in allowed:
            blocked = blocked or node
            continue
        walked.append(node)
        inputs = node.inputs[:1] if node.op in ("Reshape", "Expand", "Slice", "Unsqueeze", "Squeeze") else node.inputs
        queue.extend(t for t in inputs if not _const(t))
    return found, walked, blocked


def shape_entries(tensor: gs.Tensor) -> list[int | None] | None:
    """The entries of a 1-D shape tensor: ints where constant, None where computed at run time.

    Understands a Constant and a Concat(axis=0) of pieces of known length; None when the length
    itself is unknown.
    """
    if _const(tensor):
        return [int(v) for v in np.ravel(tensor.values)]
    node = _producer(tensor)
    if node is None or node.op != "Concat" or node.attrs.get("axis", 0) not in (0, -1):
        shape = tensor.shape
        if shape and len(shape) == 1 and isinstance(shape[0], int):
            return [None] * shape[0]
        return None
    out: list[int | None] = []
    for piece in node.inputs:
        if _const(piece):
            out.extend(int(v) for v in np.ravel(piece.values))
        elif piece.shape is not None and len(piece.shape) == 1 and isinstance(piece.shape[0], int):
            out.extend([None] * piece.shape[0])
        else:
            return None
    return out


# ----------------------------------------------------------------------------- attention
def _activation_matmul(node: gs.Node | None) -> bool:
    return node is not None and node.op == "MatMul" and not any(_const(t) for t in node.inputs)


def _key_blocks(node: gs.Node) -> list[gs.Node] | None:
    """The scores MatMuls a Concat joins on the last (key) axis, one per key block; None if it is no such Concat."""
    rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
    if node.op != "Concat" or node.attrs.get("axis") not in (-1, rank and rank - 1):
        return None
    mats = [_producer(t) for t in node.inputs]
    return mats if all(_activation_matmul(m) for m in mats) else None


def _score_mats(softmax: gs.Node) -> tuple[list[gs.Node], list[gs.Node]] | None:
    """The scores MatMul(s) within 4 ops before a Softmax (one, or one per key block) and the Reshapes
    between them and the Softmax."""
    queue = deque([(softmax.inputs[0], 0, ())])
    while queue:
        tensor, depth, reshapes = queue.popleft()
        node = _producer(tensor)
        if node is None or depth > 4:
            continue
        if _activation_matmul(node):
            return [node], list(reshapes)
        blocks = _key_blocks(node)
        if blocks is not None:
            return blocks, list(reshapes)
        if node.op == "Reshape":
            queue.append((node.inputs[0], depth + 1, (*reshapes, node)))
        elif node.op in SCORES_PATH:
            queue.extend((t, depth + 1, reshapes) for t in node.inputs if not _const(t))
    return None


def _value_mats(softmax: gs.Node) -> tuple[list[gs.Node], list[gs.Node]]:
    """The MatMul(probs, V) nodes nearest after a Softmax (through Reshape/Slice/casts, within 4 ops)
    and the Reshapes on their way."""
    frontier: list[tuple[gs.Tensor, tuple]] = [(softmax.outputs[0], ())]
    for _ in range(4):
        nxt, found, reshapes = [], [], []
        for tensor, path in frontier:
            for consumer in tensor.outputs:
                if consumer.op == "MatMul" and consumer.inputs[0] is tensor and not _const(consumer.inputs[1]):
                    found.append(consumer)
                    reshapes.extend(n for n in path if n not in reshapes)
                elif consumer.op in PROBS_PATH and consumer.inputs[0] is tensor:
                    step = (consumer,) if consumer.op == "Reshape" else ()
                    nxt.extend((t, (*path, *step)) for t in consumer.outputs)
        if found:
            return found, reshapes
        frontier = nxt
    return [], []


def _summed(values: list[gs.Node]) -> gs.Tensor | None:
    """The tensor holding the sum of the MatMuls' outputs (a chain of Adds), or their one output."""
    tensor, left = values[0].outputs[0], {id(v.outputs[0]) for v in values[1:]}
    while left:
        if len(tensor.outputs) != 1 or tensor.outputs[0].op != "Add":
            return None
        add = tensor.outputs[0]
        other = [t for t in add.inputs if t is not tensor]
        if len(other) != 1 or id(other[0]) not in left:
            return None
        left.discard(id(other[0]))
        tensor = add.outputs[0]
    return tensor


def _attention_mats(softmax: gs.Node):
    """(scores MatMuls, values MatMuls, attention output, Reshapes on the scores/probs path) around a
    Softmax, one MatMul of each per key block; or a reason string."""
    found = _score_mats(softmax)
    if found is None:
        return f"Softmax '{softmax.name}': no MatMul(Q, Kᵀ) of two activations within 4 ops before it"
    scores, score_reshapes = found
    values, prob_reshapes = _value_mats(softmax)
    if not values:
        return f"Softmax '{softmax.name}': no MatMul(probs, V) within 4 ops after it"
    if len(values) != len(scores):
        return (f"Softmax '{softmax.name}': {len(scores)} key blocks ({', '.join(m.name for m in scores)}) but "
                f"{len(values)} MatMul(probs, V) after it")
    out = _summed(values)
    if out is None:
        return f"Softmax '{softmax.name}': the MatMul(probs, V) blocks {', '.join(m.name for m in values)} are not summed by Adds"
    return scores, values, out, score_reshapes + prob_reshapes


def _cache_input(tensor: gs.Tensor, inputs: set[int]) -> gs.Tensor | None:
    """The graph input that `tensor` is, or reads through Transpose/Cast/Identity: a cached K/V block."""
    for _ in range(3):
        if id(tensor) in inputs:
            return tensor
        node = _producer(tensor)
        if node is None or node.op not in CACHE_READ:
            return None
        tensor = node.inputs[0]
    return None


def _new_block(mats: list[gs.Node], inputs: set[int]) -> tuple[gs.Tensor | None, list[str]]:
    """Of the K (or V) inputs of one attention's blocks: the one not read from a graph input, and the
    graph inputs the others read (a single block is always the new one)."""
    if len(mats) == 1:
        return mats[0].inputs[1], []
    new, cache = [], []
    for mat in mats:
        past = _cache_input(mat.inputs[1], inputs)
        if past is None:
            new.append(mat.inputs[1])
        else:
            cache.append(past.name)
    return (new[0] if len(new) == 1 else None), cache


def _output_projection(tensor: gs.Tensor):
    """Follow the attention output `tensor` through Transpose/Reshape to the output projection."""
    walked = []
    for _ in range(4):
        if len(tensor.outputs) != 1:
            return None, walked
        node = tensor.outputs[0]
        if _weight_of(node) is not None and node.inputs[0] is tensor:
            return node, walked
        if node.op not in ("Transpose", "Reshape"):
            return None, walked
        walked.append(node)
        tensor = node.outputs[0]
    return None, walked


def _head_dim(reshapes: list[gs.Node], proj_out: gs.Tensor) -> int | None:
    """head_dim from the Reshape that splits the projection's output into [.., heads, head_dim]."""
    for node in reshapes:
        if node.op != "Reshape" or node.inputs[0] is not proj_out:
            continue
        entries = shape_entries(node.inputs[1])
        if entries and len(entries) >= 2 and entries[-1] and entries[-1] > 0:
            return entries[-1]
        shape = node.outputs[0].shape
        if shape and isinstance(shape[-1], int):
            return int(shape[-1])
    return None


def _classify_shape(node: gs.Node, role: str, entries: list[int | None], counts: dict[str, int]) -> list[ShapeSite] | str:
    """Which entries of a Reshape/Expand shape on a q/k/v/o or scores path count heads.

    Rules (layout [batch, seq, heads, head_dim] after the split, [batch, heads, seq, head_dim] after
    the transpose; GQA repeat as HF's repeat_kv, or queries grouped per KV head instead):
    - on the scores/probabilities path (role "scores"), a Reshape to rank 5 [b, kv, rep, s, t]:
      entry 1 counts KV heads; to rank 4: entry 1 is the heads axis, KV heads where queries are
      grouped per KV head ([b, kv, rep·s, t]), else query heads ([b, heads, s, t]): its value says which;
    - split Reshape (rank 3 → 4) of a projection: entry -2 counts that branch's heads;
    - Reshape rank 4 → 4 grouping queries per KV head ([b, kv, rep·s, d], q path): entry 1 counts
      KV heads; and back ([b, heads, s, d], o path): entry 1 counts query heads;
    - Expand to rank 5 [b, kv, rep, s, d]: entry 1 counts KV heads;
    - Reshape rank 5 → 4 after the Expand: entry 1 counts query heads;
    - merge Reshape (rank 4 → 3) before the output projection: entry -1 is q_heads × head_dim.
    Entries that are -1/0 or computed at run time need no rewrite. Anything else that holds a head
    count is refused (the reason names the node).
    """
    rank_in = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    n = len(entries)
    heads_kind = "q_heads" if role in ("q", "o") else "kv_heads"
    if all(e is None or e <= 0 for e in entries):
        return []
    if role == "scores" and node.op == "Reshape" and n in (4, 5):
        pos, kind = 1, "kv_heads" if n == 5 or entries[1] == counts["kv_heads"] else "q_heads"
    elif role == "scores":
        return f"{node.op} '{node.name}': cannot tell which entry of its shape {entries} counts heads (scores path)"
    elif node.op == "Reshape" and n == 4 and rank_in == 3:
        pos, kind = n - 2, heads_kind
    elif node.op == "Reshape" and n == 4 and rank_in == 4 and role in ("q", "o"):
        pos, kind = 1, "kv_heads" if role == "q" else "q_heads"
    elif node.op == "Expand" and n == 5:
        pos, kind = 1, "kv_heads"
    elif node.op == "Reshape" and n == 4 and rank_in == 5:
        pos, kind = 1, "q_heads"
    elif node.op == "Reshape" and n == 3 and rank_in == 4 and role == "o":
        pos, kind = 2, "q_width"
    else:
        return f"{node.op} '{node.name}': cannot tell which entry of its shape {entries} counts heads"
    value = entries[pos]
    if value is None or value <= 0:
        return []
    if value != counts[kind]:
        return f"{node.op} '{node.name}': shape entry {pos} is {value}, expected {kind} = {counts[kind]}"
    return [ShapeSite(node.name, 1, pos, kind)]


def _match_attention(softmax: gs.Node, tensors: dict, inputs: set[int]) -> AttentionGroup | str:
    mats = _attention_mats(softmax)
    if isinstance(mats, str):
        return mats
    scores, values, out, path = mats
    if len({id(m.inputs[0]) for m in scores}) != 1:
        return f"Softmax '{softmax.name}': its key blocks {', '.join(m.name for m in scores)} read different queries"
    starts, cache = {"q": scores[0].inputs[0]}, []
    for role, blocks in (("k", scores), ("v", values)):
        starts[role], read = _new_block(blocks, inputs)
        if starts[role] is None:
            return (f"Softmax '{softmax.name}': of its {role.upper()} blocks ({', '.join(m.name for m in blocks)}), "
                    "not exactly one reads a projection with the others reading graph inputs (a cache)")
        cache += read
    branches = {}
    walked_by_role = {}
    for role, start in starts.items():
        found, walked, _ = _trace_back(start, HEAD_LAYOUT)
        if len(found) != 1:
            what = "no projection" if not found else f"{len(found)} projections ({', '.join(n.name for n in found)})"
            return f"Softmax '{softmax.name}': the {role.upper()} input '{start.name}' traces back to {what}"
        proj = _projection(found[0])
        if proj is None or found[0].op != "MatMul":
            return f"Softmax '{softmax.name}': {role.upper()} projection '{found[0].name}' is not a MatMul with an [in, out] weight"
        branches[role], walked_by_role[role] = proj, walked
    o_node, o_walked = _output_projection(out)
    if o_node is None or o_node.op != "MatMul":
        return f"Softmax '{softmax.name}': no output projection after '{out.name}' (through Transpose/Reshape only)"
    branches["o"], walked_by_role["o"], walked_by_role["scores"] = _projection(o_node), o_walked, path
    q_width = _width(tensors, branches["q"])
    kv_width = _width(tensors, branches["k"])
    if _width(tensors, branches["v"]) != kv_width:
        return f"Softmax '{softmax.name}': K and V projections differ in width"
    head_dim = _head_dim(walked_by_role["q"], tensors[branches["q"].output])
    if not head_dim or q_width % head_dim or kv_width % head_dim:
        return f"Softmax '{softmax.name}': cannot read head_dim from the Reshape after '{branches['q'].node}'"
    heads, kv_heads = q_width // head_dim, kv_width // head_dim
    if heads % kv_heads or int(tensors[branches["o"].weight].values.shape[0]) != q_width:
        return f"Softmax '{softmax.name}': {heads} query heads do not split into {kv_heads} KV groups, or o_proj width differs"
    counts = {"q_heads": heads, "kv_heads": kv_heads, "q_width": q_width}
    sites = []
    for role, walked in walked_by_role.items():
        for node in walked:
            if node.op not in SHAPE_OPS:
                continue
            entries = shape_entries(node.inputs[1])
            if entries is None:
                return f"{node.op} '{node.name}': its shape is neither constant nor a Concat of known pieces"
            found = _classify_shape(node, role, entries, counts)
            if isinstance(found, str):
                return found
            sites.extend(found)
    return AttentionGroup(branches["o"].weight, branches["q"], branches["k"], branches["v"], branches["o"],
                          heads, kv_heads, head_dim, sites, cache=tuple(cache))


def _match_fused_attention(node: gs.Node, tensors: dict, inputs: set[int]) -> AttentionGroup | str:
    """A GroupQueryAttention node and the q/k/v/o projections around it (q, k, v unpacked)."""
    if len(node.inputs) < 3 or not all(t.name for t in node.inputs[:3]):
        return (f"GroupQueryAttention '{node.name}': query, key and value are packed in one input; "
                "prune before packing them (fuse_ort_ops)")
    branches = {}
    for role, start in zip("qkv", node.inputs[:3]):
        found, _, blocked = _trace_back(start, {"Add"}, limit=2)
        proj = _projection(found[0]) if len(found) == 1 and found[0].op == "MatMul" else None
        if blocked is not None or proj is None or proj.output != start.name:
            return f"GroupQueryAttention '{node.name}': its {role.upper()} input '{start.name}' is not a MatMul projection's output"
        branches[role] = proj
    o_node, walked = _output_projection(node.outputs[0])
    if o_node is None or o_node.op != "MatMul" or walked:
        return f"GroupQueryAttention '{node.name}': its output is not read by one MatMul projection alone"
    heads, kv_heads = int(node.attrs["num_heads"]), int(node.attrs["kv_num_heads"])
    q_width = _width(tensors, branches["q"])
    head_dim = q_width // heads
    if q_width % heads or heads % kv_heads or any(_width(tensors, branches[r]) != kv_heads * head_dim for r in "kv"):
        return (f"GroupQueryAttention '{node.name}': projection widths do not fit num_heads {heads}, "
                f"kv_num_heads {kv_heads}")
    if int(tensors[o_node.inputs[1].name].values.shape[0]) != q_width:
        return f"GroupQueryAttention '{node.name}': the output projection '{o_node.name}' is not {q_width} wide"
    cache = tuple(t.name for t in node.inputs[3:5] if id(t) in inputs)
    return AttentionGroup(o_node.inputs[1].name, branches["q"], branches["k"], branches["v"], _projection(o_node),
                          heads, kv_heads, head_dim, kernel=node.name, cache=cache)


# ----------------------------------------------------------------------------- FFN and conv
def _match_ffn(node: gs.Node, tensors: dict, claimed: set[str]) -> FFNGroup | str | None:
    """An FFN down projection and its gate/up projections; None when `node` is plainly not one."""
    if node.op != "MatMul" or node.name in claimed or _weight_of(node) is None:
        return None
    width = int(node.inputs[1].values.shape[0])
    found, walked, blocked = _trace_back(node.inputs[0], ELEMENTWISE)
    if blocked is not None or not found or not walked:
        return None
    projections = [_projection(n) for n in found]
    if any(p is None or n.op != "MatMul" or n.name in claimed for p, n in zip(projections, found)):
        return None
    if any(_width(tensors, p) != width for p in projections):
        return None
    bias_adds = {p.bias_node for p in projections if p.bias_node}
    walked = [n for n in walked if n.name not in bias_adds]
    region = {id(n) for n in walked} | {id(n) for n in found} | {id(node)}
    region |= {id(tensors[p.output].inputs[0]) for p in projections if p.bias_node}
    for n in walked + found + [tensors[p.output].inputs[0] for p in projections if p.bias_node]:
        for out in n.outputs:
            if any(id(c) not in region for c in out.outputs):
                return f"FFN at '{node.name}': '{out.name}' is also read outside the block"
    for n in walked:
        for t in n.inputs:
            if _const(t) and t.values.ndim and t.values.shape[-1] == width and width > 1:
                return f"FFN at '{node.name}': '{n.name}' has a per-channel constant '{t.name}' (not sliced)"
    return FFNGroup(node.inputs[1].name, projections, _projection(node), width)


def _match_conv(node: gs.Node) -> ConvGroup | str | None:
    if node.op != "Conv" or _weight_of(node) is None:
        return None
    conv = _projection(node)
    channels = int(node.inputs[1].values.shape[0])
    tensor, bn = node.outputs[0], None
    for _ in range(3):
        consumers = tensor.outputs
        if len(consumers) != 1:
            break
        nxt = consumers[0]
        if nxt.op == "BatchNormalization" and bn is None and all(_const(t) for t in nxt.inputs[1:]):
            bn = nxt.name
        elif nxt.op not in UNARY_ACTIVATIONS or (nxt.op == "Clip" and not all(_const(t) for t in nxt.inputs[1:] if t.name)):
            break
        tensor = nxt.outputs[0]
    followers = []
    for consumer in tensor.outputs:
        if consumer.op != "Conv" or _weight_of(consumer) is None or consumer.inputs[0] is not tensor:
            return f"Conv '{node.name}': its channels reach {consumer.op} '{consumer.name}', not only Conv inputs"
        followers.append(_projection(consumer))
    if not followers:
        return f"Conv '{node.name}': its output is not read by a Conv (graph output or other op)"
    return ConvGroup(node.inputs[1].name, conv, bn, followers, channels)


def _shared_weights(group, tensors: dict) -> str | None:
    """A reason when a weight the group would slice is read by anything outside the group."""
    for name, _, _ in group.coupled():
        readers = tensors[name].outputs
        if len(readers) != 1:
            return f"tensor '{name}' is read by {len(readers)} nodes ({', '.join(n.name for n in readers)}); slicing it would change them too"
    return None


def find_structures(model: Model) -> StructureMap:
    """Attention blocks, FFN blocks and conv chains of an ONNX model, and what could not be matched."""
    model.require("onnx", "find_structures")
    graph = model.graph
    tensors = graph.tensors()
    found = StructureMap()
    claimed: set[str] = set()
    inputs = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        if node.op == "GroupQueryAttention":
            match = _match_fused_attention(node, tensors, inputs)
        elif node.op == "Softmax":
            match = _match_attention(node, tensors, inputs)
        else:
            continue
        if isinstance(match, AttentionGroup):
            reason = _shared_weights(match, tensors)
            if reason is None:
                found.attention.append(match)
                claimed.update(p.node for p in (match.q, match.k, match.v, match.o))
                continue
            match = f"attention '{match.name}': {reason}"
        found.unmatched.append(match)
    for node in graph.nodes:
        for match in (_match_ffn(node, tensors, claimed), _match_conv(node)):
            if match is None:
                continue
            if not isinstance(match, str):
                reason = _shared_weights(match, tensors)
                if reason is None:
                    (found.ffn if isinstance(match, FFNGroup) else found.conv).append(match)
                    continue
                match = f"{type(match).__name__} '{match.name}': {reason}"
            found.unmatched.append(match)
    return found
