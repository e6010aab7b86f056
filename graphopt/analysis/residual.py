"""The residual stream of a pre-norm transformer in an ONNX graph, and what reads and writes it.

A rotation x ↦ x·R of the stream (QuaRot, SpinQuant) leaves the model's function unchanged when
every use of the stream is one that a rotation passes through:
- it starts at a lookup in a constant table (the embedding): rotate the table's rows;
- an Add of the stream and the output of a linear layer (o_proj, down_proj) continues the
  stream: rotate that weight's output columns;
- an RMSNorm reads it: x·r with r = 1/√(mean(x²)+ε) per token is rotation-equivariant, since
  mean(x²) is invariant; the normalized tensor is read by linear layers, possibly through a Mul
  by a constant per-channel weight γ: fold Rᵀ·diag(γ) into those layers' input rows.
`find_residual_stream` checks exactly that and names the first node that is anything else.
A LayerNorm (mean subtraction) is anything else. `rotated_weights` is the algebra, once for the
rotate pass's ONNX and FX forms. A tied lm_head reads the table (already Rᵀ·T for the lookups), so
its norm's γ cannot be folded: it becomes a MatMul by Rᵀ·diag(γ)·R.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import UnsupportedGraphError
from graphopt.ir import Model, consumers
from graphopt.ir.decoder import position_tables

__all__ = ["Embedding", "Norm", "ResidualStream", "find_residual_stream", "rotated_weights"]

_PER_TOKEN_OPS = ("Sqrt", "Reciprocal", "Add", "Div", "Mul", "Cast")  # between ReduceMean(x²) and x·r


@dataclass
class Embedding:
    table: str   # constant [vocab, width] read along axis 0, or [width, vocab] along axis 1
    axis: int


@dataclass
class Norm:
    normalized: str          # x·r, rotation-equivariant
    gamma_node: str | None   # Mul(γ, x·r) node, γ a constant [width]
    gamma: str | None        # γ's name (identical γs may be one shared constant)
    readers: list[str]       # weights [width, out] of the MatMuls reading γ·x·r (or x·r)


@dataclass
class ResidualStream:
    width: int
    tensors: list[str] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)   # weights [in, width] whose outputs are added in
    norms: list[Norm] = field(default_factory=list)


def rotated_weights(stream: ResidualStream, r: np.ndarray, value: Callable[[str], np.ndarray],
                    gammas: dict[str, np.ndarray | None]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The stream's weights after rotating it by r, in the ONNX graph's layout (MatMul [in, out],
    tables as stored): `value(name)` reads one, `gammas[norm.normalized]` is a norm's γ (None: none).

    Returns (new values by weight name, gain matrices Rᵀ·diag(γ)·R [in, out] by norm.normalized
    for the norms read by a tied table). Every other norm's γ is folded: it must become ones.
    """
    tables = {e.table: e.axis for e in stream.embeddings}
    ones = np.ones(stream.width)
    new = {t: value(t) @ r if axis == 0 else r.T @ value(t) for t, axis in tables.items()}
    new.update({w: value(w) @ r for w in stream.writers})
    gains = {}
    for norm in stream.norms:
        gamma = gammas.get(norm.normalized)
        tied = [w for w in norm.readers if w in tables]
        if any(tables[w] != 1 for w in tied):
            raise UnsupportedGraphError(f"residual stream: '{tied[0]}' is read by a MatMul and a Gather along axis 0")
        if tied and gamma is not None:
            gains[norm.normalized] = r.T @ (gamma[:, None] * r)
            gamma = None
        folded = ones if gamma is None else gamma
        new.update({w: r.T @ (folded[:, None] * value(w)) for w in norm.readers if w not in tables})
    return new, gains


def _const_matmul(node: gs.Node, width_axis: int, width: int) -> bool:
    w = node.inputs[1] if node.op == "MatMul" and len(node.inputs) == 2 else None
    return isinstance(w, gs.Constant) and w.values.ndim == 2 and w.values.shape[width_axis] == width


def _stream_starts(graph: gs.Graph, users, positions: frozenset[str]) -> list[tuple[gs.Tensor, Embedding]]:
    """Embedding lookups: Gather(table[V, d], ids, axis 0), or Gather(table[d, V], ids, axis 1)
    then a Transpose moving d last (graphopt's lowering of a tied table); lookups of the
    `positions` tables (a decoder's rotary tables) start no stream."""
    starts = []
    for node in graph.nodes:
        if node.op != "Gather" or not isinstance(node.inputs[0], gs.Constant) or node.inputs[0].values.ndim != 2:
            continue
        if node.inputs[0].name in positions:
            continue
        if isinstance(node.inputs[1], gs.Constant) or node.inputs[0].values.dtype.kind != "f":
            continue
        axis = int(node.attrs.get("axis", 0))
        out = node.outputs[0]
        if axis == 0:
            starts.append((out, Embedding(node.inputs[0].name, 0)))
        elif axis == 1:
            readers = users.get(id(out), [])
            if len(readers) == 1 and readers[0].op == "Transpose" and list(readers[0].attrs.get("perm", []))[-1:] == [0]:
                starts.append((readers[0].outputs[0], Embedding(node.inputs[0].name, 1)))
    return starts


def _mean_square_axes_ok(node: gs.Node, x: gs.Tensor) -> bool:
    axes = node.inputs[1].values.tolist() if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) \
        else node.attrs.get("axes", [])
    last = [-1] if not isinstance(x.shape, (list, tuple)) else [-1, len(x.shape) - 1]
    return (len(np.atleast_1d(axes)) == 1 and int(np.atleast_1d(axes)[0]) in last
            and int(node.attrs.get("keepdims", 1)) == 1)


def _is_mean_square(square: gs.Node, x: gs.Tensor, users) -> bool:
    """square = Pow(x, 2), read only by a ReduceMean over the channel axis."""
    if not (square.inputs[0] is x and isinstance(square.inputs[1], gs.Constant)
            and float(square.inputs[1].values) == 2.0):
        return False
    readers = users.get(id(square.outputs[0]), [])
    return len(readers) == 1 and readers[0].op == "ReduceMean" and _mean_square_axes_ok(readers[0], x)


def _is_rms_factor(factor: gs.Tensor, x: gs.Tensor, users) -> bool:
    """factor = f(ReduceMean(Pow(x, 2), last axis)) through per-token scalar ops."""
    node = factor.inputs[0] if factor.inputs else None
    for _ in range(8):
        if node is None:
            return False
        if node.op == "ReduceMean":
            square = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
            return square is not None and square.op == "Pow" and _is_mean_square(square, x, users)
        if node.op not in _PER_TOKEN_OPS:
            return False
        variables = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        if len(variables) != 1:
            return False
        node = variables[0].inputs[0] if variables[0].inputs else None
    return False


def _norm(mul: gs.Node, x: gs.Tensor, width: int, users) -> Norm | None:
    """The Norm read by linears behind Mul(x, r), or None when x·r is used otherwise."""
    others = [t for t in mul.inputs if t is not x]
    if len(others) != 1 or isinstance(others[0], gs.Constant) or not _is_rms_factor(others[0], x, users):
        return None
    normalized = mul.outputs[0]
    readers = users.get(id(normalized), [])
    gamma_node = gamma = None
    if len(readers) == 1 and readers[0].op == "Mul":
        consts = [t for t in readers[0].inputs if isinstance(t, gs.Constant)]
        if len(consts) == 1 and consts[0].values.shape == (width,):
            gamma_node, gamma = readers[0], consts[0]
            readers = users.get(id(readers[0].outputs[0]), [])
    if not readers or not all(r.op == "MatMul" and _const_matmul(r, 0, width) for r in readers):
        return None
    return Norm(normalized.name, gamma_node.name if gamma_node else None, gamma.name if gamma else None,
                [r.inputs[1].name for r in readers])


def find_residual_stream(model: Model) -> ResidualStream:
    """The stream's tensors, embedding tables, writers and norms; raises UnsupportedGraphError
    naming the node that uses the stream in a way a rotation does not pass through."""
    model.require("onnx", "find_residual_stream")
    graph = model.graph
    users = consumers(graph)
    starts = _stream_starts(graph, users, position_tables(model))
    if not starts:
        raise UnsupportedGraphError(f"residual stream: graph '{model.name}' has no embedding lookup "
                                    "(Gather from a constant table) to start from")
    width = int(graph.tensors()[starts[0][1].table].values.shape[1 - starts[0][1].axis])
    stream = ResidualStream(width, embeddings=[e for _, e in starts])
    outputs = {id(t) for t in graph.outputs}
    seen: set[int] = set()
    todo = [t for t, _ in starts]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        stream.tensors.append(x.name)
        if id(x) in outputs:
            raise UnsupportedGraphError(f"residual stream: tensor '{x.name}' is a graph output; rotating it would change it")
        for node in users.get(id(x), []):
            if node.op == "Pow" and _is_mean_square(node, x, users):
                continue  # mean(x²) over channels is rotation-invariant; the norm's Mul is checked below
            if node.op == "Add" and len(node.inputs) == 2:
                other = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
                writer = other.inputs[0] if isinstance(other, gs.Variable) and other.inputs else None
                if id(other) in seen or any(other is t for t in todo):
                    raise UnsupportedGraphError(f"residual stream: Add '{node.name}' adds two stream tensors")
                if writer is None or not _const_matmul(writer, 1, stream.width) or len(users.get(id(other), [])) != 1 \
                        or len(users.get(id(writer.inputs[1]), [])) != 1:
                    raise UnsupportedGraphError(f"residual stream: Add '{node.name}' adds '{other.name}', which is not "
                                                "the output of a linear layer with its own constant weight")
                stream.writers.append(writer.inputs[1].name)
                todo.append(node.outputs[0])
                continue
            norm = _norm(node, x, stream.width, users) if node.op == "Mul" else None
            if norm is None:
                raise UnsupportedGraphError(f"residual stream: {node.op} '{node.name}' reads stream tensor '{x.name}' "
                                            "and is neither an RMSNorm read by linear layers nor a residual Add")
            stream.norms.append(norm)
    return stream
