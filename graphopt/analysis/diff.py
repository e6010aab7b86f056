"""Structural difference between two models in the same IR form: ops, wiring, weights, signature."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import UnsupportedGraphError
from graphopt.files.mapping import row_blocks
from graphopt.ir import Model, is_parameter_dtype

__all__ = ["GraphDiff", "WeightChange", "diff_models", "GraphView", "view_of", "distinct_params"]

# Regions and node lists in the full report are capped: a pass that rewrites every layer of a
# 2000-node graph would otherwise produce a report nobody reads.
_LIST_LIMIT = 200


# ------------------------------------------------------------------------------ neutral view
@dataclass(frozen=True)
class NodeView:
    """One op: its type and the names of the tensors it reads and writes."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class GraphView:
    """The same questions asked of an FX GraphModule or an ONNX graph.

    nodes:   node name -> NodeView (ONNX ops; FX call_function targets such as aten.linear.default)
    weights: weight name -> (shape, dtype, bytes)
    values:  weight name -> numpy array (called only for weights that need it)
    storage: name -> the array object (ONNX) or (data pointer, strides) (FX); the same in a and b
             only when both read the same memory, which skips hashing
    inputs / outputs: {"name", "dtype", "shape"} of the graph signature
    """

    form: str
    nodes: dict[str, NodeView]
    weights: dict[str, tuple[tuple[int, ...], str, int]]
    values: Callable[[str], np.ndarray]
    storage: dict[str, Any]
    inputs: list[dict]
    outputs: list[dict]
    constants: set[str] = field(default_factory=set)


def _onnx_view(model: Model) -> GraphView:
    tensors = model.graph.tensors()
    nodes: dict[str, NodeView] = {}
    for index, node in enumerate(model.graph.nodes):
        # Unnamed nodes get a name from their first output, which survives copies of the graph.
        name = node.name or f"{node.op}:{node.outputs[0].name if node.outputs else index}"
        nodes[name] = NodeView(node.op, tuple(t.name for t in node.inputs), tuple(t.name for t in node.outputs))
    constants = {n for n, t in tensors.items() if isinstance(t, gs.Constant)}

    # gs.Graph.copy shares weight arrays (or their not-yet-loaded LazyValues), so the same object
    # means the same values. Taken before parameters() loads lazy values into fresh arrays.
    storage = {name: getattr(tensors[name], "_values", None) for name in constants}
    return GraphView(
        form="onnx", nodes=nodes, weights=model.parameters(),
        values=lambda name: np.asarray(tensors[name].values), storage=storage,
        inputs=[_var_spec(v) for v in model.graph.inputs], outputs=[_var_spec(v) for v in model.graph.outputs],
        constants=constants,
    )


def _var_spec(var) -> dict:
    dtype = var.dtype
    try:
        dtype = np.dtype(dtype).name
    except TypeError:
        dtype = str(dtype)
    shape = None if var.shape is None else [d if isinstance(d, (int, str)) else str(d) for d in var.shape]
    return {"name": var.name, "dtype": str(dtype), "shape": shape}


def _fx_view(model: Model) -> GraphView:
    import torch.fx

    gm = model.fx
    # A get_attr input reads a weight: name it by the weight, so rewiring to another weight shows.
    ref = {n.name: (n.target if n.op == "get_attr" else n.name) for n in gm.graph.nodes}
    nodes: dict[str, NodeView] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        reads: list[str] = []
        torch.fx.node.map_arg((n.args, n.kwargs), lambda a: reads.append(ref[a.name]))
        nodes[n.name] = NodeView(_fx_op(n.target), tuple(reads), (n.name,))
    state = dict(gm.named_parameters())
    state.update(dict(gm.named_buffers()))
    spec = lambda s: {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}  # noqa: E731
    return GraphView(
        form="fx", nodes=nodes, weights=model.parameters(),
        values=lambda name: state[name].detach().cpu().numpy(),
        storage={name: (t.data_ptr(), t.stride()) for name, t in state.items()},
        inputs=[spec(s) for s in model.inputs], outputs=[spec(s) for s in model.outputs],
        constants=set(state) | {n.target for n in gm.graph.nodes if n.op == "get_attr"},
    )


def _fx_op(target) -> str:
    """ATen overloads print as 'aten.linear.default'; plain callables (operator.getitem) by name."""
    if isinstance(target, str) or hasattr(target, "_schema"):
        return str(target)
    return getattr(target, "__name__", str(target))


def view_of(model: Model) -> GraphView:
    """The neutral view of either form."""
    return _fx_view(model) if model.form == "fx" else _onnx_view(model)


def distinct_params(weights: dict[str, tuple[tuple[int, ...], str, int]], values: Callable[[str], np.ndarray]) -> int:
    """Parameter count with tied weights counted once.

    A tied embedding/lm_head may be stored as `W` plus its transpose `W.T` (lowering's naming,
    see graphopt.lowering); `W.T` is counted only while it holds exactly W's transpose.
    """
    total = 0
    for name, (shape, dtype, _) in weights.items():
        if not is_parameter_dtype(dtype):
            continue
        base = name[:-2] if name.endswith(".T") else None
        if base in weights and len(shape) == 2 and weights[base][0] == shape[::-1] and weights[base][1] == dtype:
            if np.array_equal(values(base).T, values(name)):
                continue
        total += int(np.prod(shape))
    return total


# ----------------------------------------------------------------------------------- the diff
@dataclass(frozen=True)
class WeightChange:
    """One initializer present in a, b or both, with what differs."""

    name: str
    status: str  # "added" | "removed" | "changed"
    shape: tuple[Any, Any]
    dtype: tuple[Any, Any]
    bytes: tuple[int, int]
    sparsity: tuple[float | None, float | None]

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "shape": [_list(s) for s in self.shape],
                "dtype": list(self.dtype), "bytes": list(self.bytes),
                "sparsity": [None if s is None else round(s, 6) for s in self.sparsity]}


def _list(shape):
    return None if shape is None else list(shape)


@dataclass
class GraphDiff:
    """What changed from model a to model b.

    ops_added / ops_removed: net change in the count of each op type
    nodes_added / nodes_removed: node names present in only one model, with op (and provenance)
    nodes_rewired: nodes present in both (by name) whose input tensors differ
    weights: added, removed and changed initializers (shape, dtype, bytes, fraction of zeros)
    regions: connected groups of changed nodes (linked through the activations they share)
    """

    form: str
    nodes: tuple[int, int]
    ops_added: dict[str, int]
    ops_removed: dict[str, int]
    nodes_added: list[dict]
    nodes_removed: list[dict]
    nodes_rewired: list[dict]
    nodes_retyped: list[dict]
    weights: list[WeightChange]
    params: tuple[int, int]
    bytes: tuple[int, int]
    inputs: dict[str, list]
    outputs: dict[str, list]
    regions: list[dict]

    @property
    def io_changed(self) -> bool:
        return any(self.inputs.values()) or any(self.outputs.values())

    @property
    def unchanged(self) -> bool:
        return not (self.nodes_added or self.nodes_removed or self.nodes_rewired or self.nodes_retyped
                    or self.weights or self.io_changed)

    def summary(self) -> dict:
        """The compact form the pipeline stores per step."""
        return {
            "ops_added": dict(self.ops_added),
            "ops_removed": dict(self.ops_removed),
            "nodes_rewired": len(self.nodes_rewired),
            "initializers_changed": len(self.weights),
            "params": [self.params[0], self.params[1]],
            "bytes": [self.bytes[0], self.bytes[1]],
            "io_changed": self.io_changed,
        }

    def to_json(self) -> dict:
        return {
            "form": self.form,
            "nodes": list(self.nodes),
            "ops_added": dict(self.ops_added),
            "ops_removed": dict(self.ops_removed),
            "nodes_added": self.nodes_added[:_LIST_LIMIT],
            "nodes_removed": self.nodes_removed[:_LIST_LIMIT],
            "nodes_rewired": self.nodes_rewired[:_LIST_LIMIT],
            "nodes_retyped": self.nodes_retyped[:_LIST_LIMIT],
            "counts": {"nodes_added": len(self.nodes_added), "nodes_removed": len(self.nodes_removed),
                       "nodes_rewired": len(self.nodes_rewired), "nodes_retyped": len(self.nodes_retyped),
                       "regions": len(self.regions)},
            "initializers": [w.to_json() for w in self.weights],
            "params": list(self.params),
            "bytes": list(self.bytes),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "io_changed": self.io_changed,
            "regions": self.regions[:_LIST_LIMIT],
        }

    def to_markdown(self) -> str:
        lines = ["# graphopt diff", ""]
        lines += ["| | a | b |", "|---|---|---|",
                  f"| nodes | {self.nodes[0]:,} | {self.nodes[1]:,} |",
                  f"| params | {self.params[0]:,} | {self.params[1]:,} |",
                  f"| bytes | {self.bytes[0]:,} | {self.bytes[1]:,} |", ""]
        if self.unchanged:
            return "\n".join(lines + ["No structural difference.", ""])
        ops = sorted(set(self.ops_added) | set(self.ops_removed))
        if ops:
            lines += ["## Ops by type", "", "| op | change |", "|---|---|"]
            lines += [f"| {op} | {_signed(self.ops_added.get(op, 0) - self.ops_removed.get(op, 0))} |" for op in ops]
            lines.append("")
        lines += _node_table("Nodes added", self.nodes_added)
        lines += _node_table("Nodes removed", self.nodes_removed)
        if self.nodes_rewired:
            lines += ["## Nodes rewired", "", "| node | op | inputs before | inputs after |", "|---|---|---|---|"]
            for r in self.nodes_rewired[:_LIST_LIMIT]:
                lines.append(f"| {r['name']} | {r['op']} | {', '.join(r['inputs'][0])} | {', '.join(r['inputs'][1])} |")
            lines += _more(len(self.nodes_rewired)) + [""]
        if self.nodes_retyped:
            lines += ["## Nodes whose op changed", "", "| node | op before | op after |", "|---|---|---|"]
            lines += [f"| {r['name']} | {r['op'][0]} | {r['op'][1]} |" for r in self.nodes_retyped[:_LIST_LIMIT]]
            lines += _more(len(self.nodes_retyped)) + [""]
        if self.weights:
            lines += ["## Initializers", "", "| name | status | shape | dtype | bytes | zeros |", "|---|---|---|---|---|---|"]
            for w in self.weights[:_LIST_LIMIT]:
                lines.append(f"| {w.name} | {w.status} | {_pair(w.shape)} | {_pair(w.dtype)} | "
                             f"{_pair(w.bytes, _int)} | {_pair(w.sparsity, _pct)} |")
            lines += _more(len(self.weights)) + [""]
        if self.io_changed:
            lines += ["## Signature", ""]
            for side in ("inputs", "outputs"):
                for kind, items in getattr(self, side).items():
                    lines += [f"- {side[:-1]} {kind}: {_spec_text(item)}" for item in items]
            lines.append("")
        if self.regions:
            lines += ["## Changed regions", ""]
            for i, region in enumerate(self.regions[:20]):
                lines.append(f"{i + 1}. {len(region['nodes'])} nodes: " + ", ".join(region["nodes"][:8])
                             + (" …" if len(region["nodes"]) > 8 else ""))
            lines += _more(len(self.regions), 20) + [""]
        return "\n".join(lines)


def _node_table(title: str, rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [f"## {title}", "", "| node | op | made by |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['op']} | {r.get('made_by') or ''} |" for r in rows[:_LIST_LIMIT]]
    return lines + _more(len(rows)) + [""]


def _more(count: int, limit: int = _LIST_LIMIT) -> list[str]:
    return [f"\n… and {count - limit} more"] if count > limit else []


def _signed(n: int) -> str:
    return f"+{n}" if n > 0 else str(n)


def _cell(value, fmt: Callable[[Any], str] = str) -> str:
    if value is None:
        return "—"
    if isinstance(value, tuple):
        return str(list(value))
    return fmt(value)


def _pair(pair, fmt: Callable[[Any], str] = str) -> str:
    a, b = (_cell(v, fmt) for v in pair)
    return a if a == b else f"{a} → {b}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _int(value: int) -> str:
    return f"{value:,}"


def _spec_text(item) -> str:
    if isinstance(item, dict) and "before" in item:
        return f"{item['name']}: {item['before']['dtype']} {item['before']['shape']} → {item['after']['dtype']} {item['after']['shape']}"
    return f"{item['name']} ({item['dtype']} {item['shape']})"


# ------------------------------------------------------------------------------- comparison
def _digest(array: np.ndarray) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((array.shape, array.dtype.str)).encode())
    for block in row_blocks(array):  # a memory-mapped weight is read a block at a time
        digest.update(np.ascontiguousarray(block).view(np.uint8).reshape(-1))
    return digest.digest()


def _zeros(array: np.ndarray) -> float | None:
    if array.size == 0 or array.dtype.kind in "OSU":  # ml_dtypes (int4, float8) count fine
        return None
    return 1.0 - sum(int(np.count_nonzero(block)) for block in row_blocks(array)) / array.size


def _same_memory(a, b) -> bool:
    return a is not None and (a is b or (isinstance(a, tuple) and a == b))


def _weight_changes(va: GraphView, vb: GraphView) -> list[WeightChange]:
    changes = []
    for name in sorted(set(va.weights) | set(vb.weights)):
        a, b = va.weights.get(name), vb.weights.get(name)
        if a and b:
            if a[0] == b[0] and a[1] == b[1]:
                same_storage = a[2] > 0 and _same_memory(va.storage.get(name), vb.storage.get(name))
                # Values are compared (by hash) only when shape and dtype match.
                if same_storage or _digest(va.values(name)) == _digest(vb.values(name)):
                    continue
            status = "changed"
        else:
            status = "added" if b else "removed"
        changes.append(WeightChange(
            name=name, status=status,
            shape=(a[0] if a else None, b[0] if b else None),
            dtype=(a[1] if a else None, b[1] if b else None),
            bytes=(a[2] if a else 0, b[2] if b else 0),
            sparsity=(_zeros(va.values(name)) if a else None, _zeros(vb.values(name)) if b else None),
        ))
    return changes


def _signature(a: list[dict], b: list[dict]) -> dict[str, list]:
    before = {s["name"]: s for s in a}
    after = {s["name"]: s for s in b}
    return {
        "added": [after[n] for n in after if n not in before],
        "removed": [before[n] for n in before if n not in after],
        "changed": [{"name": n, "before": before[n], "after": after[n]}
                    for n in before if n in after and before[n] != after[n]],
    }


def _regions(va: GraphView, vb: GraphView, changed: set[str]) -> list[dict]:
    """Connected groups of changed nodes, linked through the activations they read or write."""
    graph = nx.Graph()
    for view in (va, vb):
        for name, node in view.nodes.items():
            if name not in changed:
                continue
            graph.add_node(("n", name))
            for tensor in node.inputs + node.outputs:
                if tensor and tensor not in view.constants:
                    graph.add_edge(("n", name), ("t", tensor))
    order = {name: i for i, name in enumerate(list(va.nodes) + [n for n in vb.nodes if n not in va.nodes])}
    regions = []
    for component in nx.connected_components(graph):
        names = sorted((v[1] for v in component if v[0] == "n"), key=lambda n: order.get(n, 0))
        tensors = sorted(v[1] for v in component if v[0] == "t")
        regions.append({"nodes": names, "tensors": tensors[:_LIST_LIMIT]})
    regions.sort(key=lambda r: order.get(r["nodes"][0], 0))
    return regions


def _node_row(name: str, node: NodeView, model: Model) -> dict:
    row = {"name": name, "op": node.op}
    made_by = model.meta.provenance.get(name)
    if made_by:
        row["made_by"] = made_by
    return row


def diff_models(a: Model, b: Model) -> GraphDiff:
    """Compare `a` (before) with `b` (after); both must be in the same IR form.

    Nodes are matched by name (object identity does not survive a copy); weights by name,
    compared by shape and dtype first and by a hash of their bytes only when those agree.
    """
    if a.form != b.form:
        raise UnsupportedGraphError(
            f"diff needs two models in the same form, got {a.form.upper()} ('{a.name}') and "
            f"{b.form.upper()} ('{b.name}'): lower the FX one first (graphopt.lower)"
        )
    va, vb = view_of(a), view_of(b)
    ops_a = Counter(n.op for n in va.nodes.values())
    ops_b = Counter(n.op for n in vb.nodes.values())
    added = [_node_row(n, vb.nodes[n], b) for n in vb.nodes if n not in va.nodes]
    removed = [_node_row(n, va.nodes[n], a) for n in va.nodes if n not in vb.nodes]
    rewired, retyped = [], []
    for name, na in va.nodes.items():
        nb = vb.nodes.get(name)
        if nb is None:
            continue
        if nb.op != na.op:
            retyped.append({"name": name, "op": [na.op, nb.op]})
        if nb.inputs != na.inputs:
            rewired.append({"name": name, "op": nb.op, "inputs": [list(na.inputs), list(nb.inputs)]})
    changed = {r["name"] for r in added + removed + rewired + retyped}
    return GraphDiff(
        form=a.form,
        nodes=(len(va.nodes), len(vb.nodes)),
        ops_added=dict(sorted((ops_b - ops_a).items())),
        ops_removed=dict(sorted((ops_a - ops_b).items())),
        nodes_added=added, nodes_removed=removed, nodes_rewired=rewired, nodes_retyped=retyped,
        weights=_weight_changes(va, vb),
        params=(distinct_params(va.weights, va.values), distinct_params(vb.weights, vb.values)),
        bytes=(sum(w[2] for w in va.weights.values()), sum(w[2] for w in vb.weights.values())),
        inputs=_signature(va.inputs, vb.inputs),
        outputs=_signature(va.outputs, vb.outputs),
        regions=_regions(va, vb, changed),
    )
