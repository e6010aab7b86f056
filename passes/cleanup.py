"""cleanup: remove no-op Identity/Cast nodes, fold static shapes and constants, drop dead nodes, sort."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.errors import OptionError
from graphopt.ir import MIN_OPSET, Model, graph_opset
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass

__all__ = ["Cleanup"]

log = logging.getLogger(__name__)

# ops that only give their input another shape, and the size from which such a view of a constant other
# nodes also read stays a view (e.g. a lookup's rows of a kernel's packed weight): folding would duplicate it
_VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
SHARED_VIEW_BYTES = 4096
# Folding these would change what the graph means or only copy data:
# randomness, control flow, quantization boundaries that backends read, and Identity (a copy).
_NEVER_FOLD = {
    "Identity", "If", "Loop", "Scan",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
}


def _is_empty(tensor: gs.Tensor) -> bool:
    """An omitted optional input."""
    return isinstance(tensor, gs.Variable) and not tensor.name


def _elem_type(tensor: gs.Tensor) -> int | None:
    """The ONNX element type of a tensor, or None when the graph does not say."""
    export_dtype = getattr(tensor, "export_dtype", None)
    dtype = export_dtype if export_dtype is not None else tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


def _index_of(items, tensor) -> int | None:
    """Position of `tensor` in a tensor list by identity (gs compares tensors by name)."""
    return next((i for i, t in enumerate(items) if t is tensor), None)


def _is_sorted(graph: gs.Graph) -> bool:
    """Whether every node's inputs are produced before it (or are inputs / constants)."""
    ready = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) or _is_empty(t) or id(t) in ready:
                continue
            if not t.inputs:  # an outer-scope or dangling value: no producer to order against
                continue
            return False
        ready.update(id(t) for t in node.outputs)
    return True


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) for v in node.attrs.values())


# ------------------------------------------------------------------- no-op removal (rules 2, 3)
def _no_op_reason(node: gs.Node, remove_identities: bool, remove_noop_casts: bool) -> str | None:
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.domain not in (None, "", "ai.onnx"):
        return None
    if node.op == "Identity" and remove_identities:
        return "identities"
    if node.op == "Cast" and remove_noop_casts:
        source = _elem_type(node.inputs[0])
        if source is not None and source == node.attrs.get("to"):
            return "noop_casts"
    return None


def _bypass(graph: gs.Graph, node: gs.Node, guarded_names: set[str]) -> bool:
    """Route the consumers of `node`'s output to its input; False (nothing done) when unsafe.

    A graph output keeps its name: the input tensor takes it, which is only allowed when the input
    is a plain intermediate value (not a graph input, a graph output, a constant, or a tensor that
    metadata refers to by name).
    """
    src, dst = node.inputs[0], node.outputs[0]
    if dst.name in guarded_names:  # an encoding or mask keyed by this name would lose its tensor
        return False
    out_pos = _index_of(graph.outputs, dst)
    if out_pos is not None:
        if (_index_of(graph.inputs, src) is not None or _index_of(graph.outputs, src) is not None
                or isinstance(src, gs.Constant) or src.name in guarded_names):
            log.debug("cleanup: keeping %s '%s': it joins %s to graph output '%s'", node.op, node.name, src.name, dst.name)
            return False
    for consumer in list(dst.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is dst:
                consumer.inputs[i] = src
    if out_pos is not None:
        name = dst.name
        dst.name = f"{name}__bypassed"
        src.name = name
        src.dtype = src.dtype if src.dtype is not None else dst.dtype
        src.shape = dst.shape if dst.shape is not None else src.shape
        graph.outputs[out_pos] = src
    node.inputs.clear()
    node.outputs.clear()
    return True


# --------------------------------------------------------------------- folding (rules 4, 5)
def _shape_dims(shape_node: gs.Node) -> list[int | None] | None:
    """The dims a Shape node reports (its start/end applied); None entries are dynamic."""
    shape = shape_node.inputs[0].shape
    if shape is None:
        return None
    dims = [d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]
    start = shape_node.attrs.get("start", 0)
    end = shape_node.attrs.get("end", None)
    return dims[start:end]


def _static_shape(node: gs.Node) -> np.ndarray | None:
    """Rule 4a: Shape(x) when every reported dim of x is static."""
    dims = _shape_dims(node)
    if dims is None or any(d is None for d in dims):
        return None
    return np.asarray(dims, dtype=np.int64)


def _static_part_of_shape(node: gs.Node, opset: int) -> np.ndarray | None:
    """Rule 4b: Gather/Slice picking only static dims out of a partly dynamic Shape(x).

    The node is evaluated on the dim *positions* (0, 1, ...) to learn which dims it picks.
    """
    data = node.inputs[0] if node.inputs else None
    if node.op not in ("Gather", "Slice") or not isinstance(data, gs.Variable) or len(data.inputs) != 1:
        return None
    producer = data.inputs[0]
    if producer.op != "Shape" or not all(isinstance(t, gs.Constant) or _is_empty(t) for t in node.inputs[1:]):
        return None
    dims = _shape_dims(producer)
    if dims is None:
        return None
    positions = np.arange(len(dims), dtype=np.int64)
    picked = _evaluate(node, [positions] + [None if _is_empty(t) else t.values for t in node.inputs[1:]], opset)
    if picked is None:
        return None
    chosen = [dims[int(p)] for p in np.ravel(picked[0])]
    if any(d is None for d in chosen):
        return None
    return np.asarray(chosen, dtype=np.int64).reshape(np.shape(picked[0]))


def _evaluate(node: gs.Node, values: list[np.ndarray | None], opset: int) -> list[np.ndarray] | None:
    """Run one node with the ONNX reference evaluator; None when it cannot (logged at debug level)."""
    from onnx.reference import ReferenceEvaluator
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    proto = OnnxExporter.export_node(node)
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(values)]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    del proto.input[:], proto.output[:]
    proto.input.extend(names)
    proto.output.extend(outs)
    feeds = {n: np.asarray(v) for n, v in zip(names, values) if n}
    graph = onnx.helper.make_graph(
        [proto], "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(o) for o in outs],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception as exc:  # the reference evaluator raises anything; folding is optional
        log.debug("cleanup: cannot fold %s '%s': %s", node.op, node.name, exc)
        return None
    if not all(isinstance(r, (np.ndarray, np.generic)) for r in results):
        # a sequence, map or optional value (SequenceEmpty gives []) has no tensor constant to become
        log.debug("cleanup: not folding %s '%s': it makes a non-tensor value", node.op, node.name)
        return None
    return [np.asarray(r) for r in results]


def _fold_value(node: gs.Node, graph_outputs: set[int], opset: int) -> tuple[str, list[np.ndarray]] | None:
    """What `node` folds to, and under which rule; None when it must stay."""
    if node.op in _NEVER_FOLD or node.domain not in (None, "", "ai.onnx") or _has_subgraph(node):
        return None
    if any(id(t) in graph_outputs for t in node.outputs):
        return None
    if node.op == "Shape":
        shape = _static_shape(node)
        return ("folded_shapes", [shape]) if shape is not None else None
    partial = _static_part_of_shape(node, opset)
    if partial is not None:
        return "folded_shapes", [partial]
    inputs = [t for t in node.inputs if not _is_empty(t)]
    if not all(isinstance(t, gs.Constant) for t in inputs):
        return None
    if node.op == "Cast" and _widens(node):
        return None  # narrow storage (store_half's float16 + Cast): onnxruntime folds it at load
    if node.op in _VIEWS and len(inputs[0].outputs) > 1 and inputs[0].values.nbytes >= SHARED_VIEW_BYTES:
        return None  # another shape of a constant other nodes read too: folding would store its bytes twice
    values = _evaluate(node, [None if _is_empty(t) else t.values for t in node.inputs], opset)
    return ("folded_constants", values) if values is not None else None


def _widens(cast: gs.Node) -> bool:
    """A Cast of a float constant to a wider float type (float16 -> float32); integer casts of shape
    arithmetic still fold."""
    source = np.dtype(cast.inputs[0].values.dtype)
    target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(cast.attrs["to"])) if "to" in cast.attrs else source
    return source.kind == target.kind == "f" and target.itemsize > source.itemsize


def _fold(graph: gs.Graph, size_limit: int, stats: Counter) -> None:
    """Replace foldable nodes' outputs by constants, in topological order so chains fold at once."""
    graph_outputs = {id(t) for t in graph.outputs}
    opset = graph_opset(graph, default=MIN_OPSET)
    for node in list(graph.nodes):
        if not node.outputs:
            continue
        found = _fold_value(node, graph_outputs, opset)
        if found is None:
            continue
        rule, values = found
        if len(values) != len(node.outputs) or any(v.dtype.kind not in "biuf" for v in values):
            continue
        size = sum(int(v.nbytes) for v in values)
        if size > size_limit:
            stats["fold_skipped_large"] += 1
            log.debug("cleanup: not folding %s '%s': %d bytes > limit %d", node.op, node.name, size, size_limit)
            continue
        for tensor, value in zip(node.outputs, values):
            tensor.to_constant(np.asarray(value, order="C"))  # ascontiguousarray would make scalars 1-D
        node.inputs.clear()
        node.outputs.clear()
        stats[rule] += 1


# ------------------------------------------------------------------------------------- the pass
@register_pass
@dataclass(frozen=True)
class Cleanup(Pass):
    """Tidy an ONNX graph without changing what it computes.

    Reads nothing but the graph. Rewrites, in this order:

    1. Dead nodes: nodes whose outputs reach no graph output are removed (also after rules 2-5).
    2. Identity: consumers read the Identity's input instead. Does NOT fire when the Identity
       joins a graph input, a graph output or a constant straight to a graph output (the graph's
       signature and names stay), nor when metadata (encodings, masks) names its output, or names
       its input and the input would have to take the graph output's name.
    3. Cast to the dtype its input already has: removed like an Identity, same exceptions. Does
       NOT fire when the input's dtype is unknown.
    4. Static shapes: `Shape(x)` becomes a constant when the dims it reports are static; a
       `Gather`/`Slice` of a partly dynamic shape becomes one when it picks static dims only.
    5. Constants: a node whose inputs are all constants becomes its value. Does NOT fire on
       Identity, Q/DQ (the quantization boundary backends read), random or control-flow ops, nodes
       feeding a graph output, nodes that make a sequence, map or optional value (SequenceEmpty),
       or when the result exceeds `fold_size_limit` bytes (so a shared weight is never copied into
       a large duplicate), nor on a Cast that widens a float constant (float16 written for
       float32, as `store_half` does: folding it would double those bytes on disk), nor on a
       Reshape / Flatten / Squeeze / Unsqueeze of a constant of SHARED_VIEW_BYTES or more that
       other nodes also read (the same bytes twice).
    6. Topological sort, only when the node order is not already valid.

    Guarantees: graph outputs, their names and the input signature are unchanged; outputs equal
    the input model's within float rounding (folding evaluates in numpy). Leaves no metadata.
    `stats` counts each rule's firings; `changed` is true only if one fired.
    """

    name: ClassVar[str] = "cleanup"
    mutates_input: ClassVar[bool] = True

    fold_constants: bool = field(default=True, metadata={"help": "fold static shapes and all-constant subgraphs"})
    fold_size_limit: int = field(default=1 << 20, metadata={"help": "largest folded result in bytes"})
    remove_identities: bool = field(default=True, metadata={"help": "bypass Identity nodes"})
    remove_noop_casts: bool = field(default=True, metadata={"help": "bypass Cast to the same dtype"})

    def check(self) -> None:
        if self.fold_size_limit < 0:
            raise OptionError(f"'cleanup': option 'fold_size_limit' must be >= 0 bytes, got {self.fold_size_limit}")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        stats: Counter = Counter()
        stats["dead_nodes"] += _remove_dead(graph)
        if not _is_sorted(graph):
            graph.toposort()
            stats["reordered"] += 1
        guarded = set(model.meta.encodings) | set(model.meta.masks)
        for node in list(graph.nodes):
            reason = _no_op_reason(node, self.remove_identities, self.remove_noop_casts)
            if reason and _bypass(graph, node, guarded):
                stats[reason] += 1
        if self.fold_constants:
            _fold(graph, self.fold_size_limit, stats)
        emptied = sum(1 for n in graph.nodes if not n.outputs)
        stats["dead_nodes"] += _remove_dead(graph) - emptied
        changed = any(v for k, v in stats.items() if k != "fold_skipped_large")
        return PassResult(model, changed, {k: v for k, v in sorted(stats.items()) if v})


def _remove_dead(graph: gs.Graph) -> int:
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False)
    return before - len(graph.nodes)
