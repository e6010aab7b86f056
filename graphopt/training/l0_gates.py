"""Hard-concrete L0 gates on attention heads and FFN channels of an FX model: learned pruning scores.

Louizos et al. (2018) gates: each unit (a query head feeding the output projection, an FFN channel
feeding the down projection) is multiplied by z ∈ [0, 1] drawn from a stretched, clamped concrete
distribution with a learned log α. Training the gates with `penalty()` (the expected number of open
gates) added to the task loss drives unneeded units to zero; `scores()` then hands the open
probabilities to `prune_structure` (`importance: scores`), keyed by the weight that reads the units,
which is also the initializer's name in the lowered ONNX model.

Sites are found in the FX graph: a linear whose input is a view/reshape of a [.., heads, head_dim]
tensor (an attention output projection), or whose input is an elementwise product/activation of
linears (an FFN down projection).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from graphopt.errors import UnsupportedGraphError
from graphopt.ir import Model

__all__ = ["HardConcreteGate", "L0Gates", "attach_l0_gates"]

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
_RESHAPES = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"}
_FFN_INPUTS = {"aten.mul.Tensor", "aten.silu.default", "aten.gelu.default", "aten.relu.default"}


class HardConcreteGate(torch.nn.Module):
    """`units` gates, each repeated `unit_size` times along the last axis of the input it multiplies.

    `sampling` True draws stochastic gates (training); False uses the deterministic gate
    clamp(sigmoid(log α)·(ζ−γ)+γ, 0, 1), which is exactly 1 at the default init (outputs unchanged).
    """

    def __init__(self, units: int, unit_size: int, init: float = 3.0):
        super().__init__()
        self.units, self.unit_size = units, unit_size
        self.log_alpha = torch.nn.Parameter(torch.full((units,), float(init)))
        self.sampling = False

    def gate(self) -> torch.Tensor:
        if self.sampling:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def open_probability(self) -> torch.Tensor:
        """P(z > 0): the expected L0 contribution of each unit."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate().repeat_interleave(self.unit_size).to(x.dtype)


def _weight_name(gm, node) -> str | None:
    weight = node.args[1] if len(node.args) > 1 else None
    if getattr(weight, "op", None) == "get_attr":
        return str(weight.target)
    if getattr(weight, "op", None) == "placeholder":
        return getattr(weight, "name", None)
    return None


def _shape(node) -> tuple | None:
    value = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(value.shape) if hasattr(value, "shape") else None


def _site(node) -> tuple[int, int] | None:
    """(units, unit_size) when `node` is a linear reading heads or FFN channels, else None."""
    if node.op != "call_function" or str(node.target) != "aten.linear.default":
        return None
    x = node.args[0]
    in_features = _shape(node.args[1])[-1] if _shape(node.args[1]) else None
    if getattr(x, "op", None) != "call_function" or not in_features:
        return None
    if str(x.target) in _RESHAPES:
        source = _shape(x.args[0])
        if source and len(source) == 4 and all(isinstance(d, int) for d in source[-2:]) and source[-2] * source[-1] == in_features:
            return int(source[-2]), int(source[-1])
    if str(x.target) in _FFN_INPUTS and _elementwise_of_linears(x):
        return in_features, 1
    return None


def _elementwise_of_linears(node) -> bool:
    """Whether `node` is built by products/activations from linears only (SiLU(gate)·up, GELU(fc)), not a norm."""
    reached, queue = False, [node]
    while queue:
        current = queue.pop()
        if getattr(current, "op", None) != "call_function":
            return False
        if str(current.target) == "aten.linear.default":
            reached = True
            continue
        if str(current.target) not in _FFN_INPUTS:
            return False
        queue.extend(a for a in current.args if hasattr(a, "op"))
    return reached


class L0Gates:
    """Gates attached to an FX model's graph (see `attach_l0_gates`)."""

    def __init__(self, model: Model, gates: dict[str, HardConcreteGate], inserted: dict[str, tuple]):
        self.model, self.gates, self._inserted = model, gates, inserted

    def parameters(self):
        return [g.log_alpha for g in self.gates.values()]

    def sampling(self, on: bool) -> None:
        for gate in self.gates.values():
            gate.sampling = on

    def penalty(self) -> torch.Tensor:
        """Expected fraction of open gates over all units (add λ·penalty to the training loss)."""
        open_ = torch.cat([g.open_probability() for g in self.gates.values()])
        return open_.mean()

    def scores(self) -> dict[str, list[float]]:
        """Weight name (the layer reading the units) → deterministic gate value per unit."""
        with torch.no_grad():
            return {name: [float(v) for v in g.open_probability()] for name, g in self.gates.items()}

    def save_scores(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.scores(), indent=1))
        return path

    def detach(self) -> None:
        """Remove the gates from the graph; the model computes what it did before attaching."""
        gm = self.model.fx
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target in self._inserted:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                delattr(gm, node.target)
        gm.graph.lint()
        gm.recompile()
        self._inserted.clear()


def attach_l0_gates(model: Model, *, heads: bool = True, ffn: bool = True, init: float = 3.0) -> L0Gates:
    """Insert a gate before every attention output projection (per head) and FFN down projection
    (per channel) of `model`'s FX graph, in place. At the default init the gates are exactly 1."""
    model.require("fx", "attach_l0_gates")
    gm = model.fx
    gates, inserted = {}, {}
    for node in list(gm.graph.nodes):
        site = _site(node)
        name = _weight_name(gm, node) if site else None
        if site is None or name is None:
            continue
        is_heads = site[1] > 1
        if (is_heads and not heads) or (not is_heads and not ffn):
            continue
        gate = HardConcreteGate(site[0], site[1], init)
        target = f"l0_gate_{len(gates)}"
        gm.add_submodule(target, gate)
        with gm.graph.inserting_before(node):
            gated = gm.graph.call_module(target, (node.args[0],))
        node.replace_input_with(node.args[0], gated)
        gates[name], inserted[target] = gate, site
    if not gates:
        raise UnsupportedGraphError(
            f"attach_l0_gates: no attention output projection or FFN down projection found in '{model.name}' "
            "(looked for aten.linear reading a [.., heads, head_dim] reshape or an elementwise product)")
    gm.graph.lint()
    gm.recompile()
    return L0Gates(model, gates, inserted)
