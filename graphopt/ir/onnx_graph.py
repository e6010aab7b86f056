"""Helpers for the ONNX form's graph (onnx-graphsurgeon): who reads a tensor, which opset it has."""

from __future__ import annotations

import onnx_graphsurgeon as gs

__all__ = ["consumers", "graph_opset"]


def consumers(graph: gs.Graph) -> dict[int, list[gs.Node]]:
    """Nodes reading each tensor, keyed by id(tensor) (graphsurgeon tensors are not hashable by value)."""
    found: dict[int, list[gs.Node]] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            found.setdefault(id(tensor), []).append(node)
    return found


def graph_opset(graph: gs.Graph, default: int = 0) -> int:
    """The default-domain opset a graph imports (`default` when it names none)."""
    for entry in graph.import_domains or []:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return int(graph.opset or default)
