"""online_rotate: a block-Hadamard rotation of chosen linears' inputs, computed in the graph, with
its transpose folded into their weights (QuaRot's online R4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.linear_sites import ONLINE_ROTATION, linear_sites
from graphopt.errors import OptionError
from graphopt.ir import Model, consumers
from graphopt.ir.names import name_matches
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant.rotation import rotation

__all__ = ["OnlineRotate"]


@register_pass
@dataclass(frozen=True)
class OnlineRotate(Pass):
    """Rotate the input x of every MatMul linear whose [in, out] weight W matches `weights` by a
    block-diagonal orthogonal H (blocks of `block` channels, each a Hadamard matrix with random
    signs: graphopt.quant.rotation.rotation(block, seed)), computed at run time, and fold Hᵀ into
    W's rows: x·W = (x·H)·(Hᵀ·W), exact in float.

    For the inputs no weight before them can absorb a rotation, which `rotate` therefore cannot
    reach: SwiGLU's down_proj reads an elementwise product, whose few huge channels ruin per-tensor
    8-bit activations. Rotated, they are spread over `block` channels. The cost is one
    [block, block] MatMul per `block` input channels per token (SmolLM2's down_proj at blocks of 64: 1536·64 MACs,
    11 % of its own); mixing the weight's rows within a block also evens out int4 weight blocks.
    Graph: x → Reshape [-1, block] → MatMul(H) → Reshape(Shape(x)) → the linears that matched.
    An input width K that `block` does not divide (an intermediate size of 200 at blocks of 32) is
    padded with zeros to whole blocks first (x → Pad → ...), and W gets as many zero rows before Hᵀ
    is folded in: x·W = [x, 0]·[W; 0], still exact; the linear's K grows to the next multiple of
    `block` (every block of the rotation spreads outliers as wide).
    H is one shared constant named `ONLINE_ROTATION.BLOCK` (.SEED for a seed other than 0); `linear_sites` does not list it, so
    `quantize` leaves it and its input float, and quantizes its output (the linear's input).
    Does NOT fire on a weight that other nodes read too (a tied table): OptionError naming it, as
    for a pattern that matches no linear weight.
    Run it after passes that need the original channels (structural pruning).
    """

    name: ClassVar[str] = "online_rotate"
    mutates_input: ClassVar[bool] = True

    weights: tuple[str, ...] = field(default=("*down_proj*",), metadata={
        "help": "linears whose input is rotated (weight names, globs, 're:...')"})
    block: int = field(default=64, metadata={"help": "channels per Hadamard block: a power of two"})
    seed: int = field(default=0, metadata={"help": "seed of the Hadamard blocks' random signs"})

    def check(self) -> None:
        if self.block < 2 or self.block & (self.block - 1):
            raise OptionError(f"'online_rotate': option 'block' must be a power of two >= 2, got {self.block}")
        if not self.weights:
            raise OptionError("'online_rotate': option 'weights' names no linear")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        sites = [s for s in linear_sites(model) if s.op == "MatMul" and name_matches(s.weight, self.weights)]
        for pattern in self.weights:
            if not any(name_matches(s.weight, (pattern,)) for s in sites):
                raise OptionError(f"'online_rotate': option 'weights': '{pattern}' matches no MatMul linear of '{model.name}'")
        graph = model.graph
        tensors, readers = graph.tensors(), consumers(graph)
        for site in sites:
            weight = tensors[site.weight]
            if len(readers.get(id(weight), [])) > 1:
                raise OptionError(f"'online_rotate': weight '{site.weight}' is read by other nodes too")
        h = rotation(self.block, self.seed)
        name = f"{ONLINE_ROTATION}.{self.block}" + (f".{self.seed}" if self.seed else "")
        matrix = tensors.get(name) or gs.Constant(name, h.astype(np.float32))  # a second run shares the first's
        rows = tensors.get(f"{name}.rows") or gs.Constant(f"{name}.rows", np.array([-1, self.block], np.int64))
        nodes = {n.name: n for n in graph.nodes}
        rotated: dict[str, gs.Variable] = {}
        for site in sites:
            weight = tensors[site.weight]
            extra = -weight.values.shape[0] % self.block  # zero rows for the zeros the input is padded with
            w = np.pad(np.asarray(weight.values, np.float64), ((0, extra), (0, 0)))
            folded = np.einsum("ji,njo->nio", h, w.reshape(-1, self.block, w.shape[1])).reshape(w.shape)
            weight.values = folded.astype(np.float32)  # replaced, never written into (shared arrays)
            node = nodes[site.node]
            if site.activation not in rotated:
                rotated[site.activation] = _rotation(graph, node.inputs[0], matrix, rows, extra)
            node.inputs[0] = rotated[site.activation]
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(model, bool(sites), {"rotated_inputs": len(rotated), "weights": len(sites), "block": self.block})


def _rotation(graph: gs.Graph, x: gs.Variable, matrix: gs.Constant, rows: gs.Constant, extra: int) -> gs.Variable:
    """x ↦ Reshape(Reshape(x, [-1, block]) · H, Shape(x)): H applied to each block of x's last axis,
    after `extra` zeros are appended to that axis (Pad) when the block does not divide it."""
    tag = f"{x.name}.{ONLINE_ROTATION}"
    shape = gs.Variable(f"{tag}.shape", np.int64)
    blocks = gs.Variable(f"{tag}.blocks", x.dtype)
    turned = gs.Variable(f"{tag}.turned", x.dtype)
    out = gs.Variable(f"{tag}.out", x.dtype, None if extra else x.shape)
    if extra:
        padded = gs.Variable(f"{tag}.padded", x.dtype)
        pads = gs.Constant(f"{tag}.pads", np.array([0, extra], np.int64))
        last = gs.Constant(f"{tag}.last", np.array([-1], np.int64))
        graph.nodes.append(gs.Node("Pad", f"{tag}/Pad", inputs=[x, pads, gs.Constant(f"{tag}.zero", np.zeros((), np.float32)), last],
                                   outputs=[padded]))
        x = padded
    graph.nodes += [gs.Node("Shape", f"{tag}/Shape", inputs=[x], outputs=[shape]),
                    gs.Node("Reshape", f"{tag}/Split", inputs=[x, rows], outputs=[blocks]),
                    gs.Node("MatMul", f"{tag}/MatMul", inputs=[blocks, matrix], outputs=[turned]),
                    gs.Node("Reshape", f"{tag}/Join", inputs=[turned, shape], outputs=[out])]
    return out
