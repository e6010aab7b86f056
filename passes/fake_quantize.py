"""fake_quantize: trainable fake-quant (STE, learnable scales) at every linear weight and input, FX form."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from graphopt.analysis.sensitivity import int16_budget_count, int16_share, read_sensitivity
from graphopt.errors import OptionError
from graphopt.ir import Model
from graphopt.ir.names import name_matches
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant.spec import QuantSpec, dtype_for
from graphopt.training import fake_quant

__all__ = ["FakeQuantize"]


@register_pass
@dataclass(frozen=True)
class FakeQuantize(Pass):
    """Insert trainable fake quantizers into the torch.export graph, for quantization-aware training.

    Reads: calibration feeds (`ctx.calib`) for activation ranges; without activations, weights
    alone calibrate from the model's sample inputs.
    Rules:
      1. Every `aten.linear` whose weight is a parameter gets a weight quantizer after the
         parameter read (`weight_bits`, per output channel or per tensor); a tied embedding
         table is one quantizer serving the lookup and the lm_head alike.
      2. The activation entering those linears gets one per-tensor quantizer per distinct tensor
         (`activation_bits`; 0 keeps activations float), rewired into the linears only — a
         residual add reading the same tensor stays float.
      3. Weights named in `skip` (parameter names) keep weight and input float; weights named in
         `int16_weights` get 16-bit weight quantizers.
      4. The inputs of weights matching `int16_inputs` (names, globs or 're:...'), then the most
         sensitive activation points of a `graphopt sensitivity` ranking up to `int16_budget` × the
         activation points (`int16_budget_over` "activations") or × all points, weights included,
         less the 16-bit weights ("points"), get 16 bits.
      5. A model that already holds quantizers, or has no linear layer, is left untouched.
      6. `weight_rounding` "gptq": after calibration, linear weights (not embedding tables) are
         replaced by their GPTQ rounding on their quantizer's grid (fake_quant.gptq_round_weights),
         from the float model's input Hessians over the calibration feeds, as the quantize pass's
         GPTQ; training then starts from those weights.
    Guarantees: scales start at min-max of calibration (activations: `observer`'s range, as in
    the quantize pass), so the fake-quant model computes what a static QDQ model with those
    scales computes; with the
    quantizers switched off (`fake_quant.set_fake_quant(model, False)`) it is the float model exactly.
    Leaves: model.meta.extra["fake_quant"], one record per quantizer (module, kind, name, feeds);
    `graphopt.training.distillation.train` fine-tunes, `fake_quant.export_encodings` writes the scales.
    """

    name = "fake_quantize"

    weight_bits: int = field(default=8, metadata={"help": "4, 8 or 16"})
    weight_granularity: Literal["channel", "tensor"] = "channel"
    weight_symmetric: bool = True
    activation_bits: int = field(default=8, metadata={"help": "0 (float), 8 or 16"})
    activation_symmetric: bool = False
    skip: tuple[str, ...] = field(default=(), metadata={"help": "weight names kept float (with their input)"})
    int16_inputs: tuple[str, ...] = field(default=(), metadata={
        "help": "weights (names, globs, 're:...') whose input is kept at 16 bits"})
    int16_weights: tuple[str, ...] = field(default=(), metadata={"help": "weight names quantized at 16 bits (e.g. rotate's gain)"})
    int16_budget: float = field(default=0.0, metadata={"help": "fraction of points at 16 bits (see int16_budget_over)"})
    int16_budget_over: Literal["activations", "points"] = field(default="activations", metadata={
        "help": "what int16_budget is a fraction of: 'activations' (activation points) or 'points' "
                "(activations and weights; 16-bit weights count against it)"})
    sensitivity: str = field(default="", metadata={"file": True, "help": "sensitivity JSON ranking the points (for int16_budget)"})
    observer: Literal["minmax", "percentile", "mse"] = field(default="minmax", metadata={"help": "initial activation ranges"})
    weight_rounding: Literal["rtn", "gptq"] = field(
        default="rtn", metadata={"help": "initial weights: round to nearest, or GPTQ (needs calibration)"})

    def check(self) -> None:
        if self.weight_bits not in (4, 8, 16):
            raise OptionError(f"'fake_quantize': option 'weight_bits' must be 4, 8 or 16, got {self.weight_bits}")
        if self.activation_bits not in (0, 8, 16):
            raise OptionError(
                f"'fake_quantize': option 'activation_bits' must be 0, 8 or 16, got {self.activation_bits}")
        if not 0.0 <= self.int16_budget <= 1.0:
            raise OptionError(f"'fake_quantize': option 'int16_budget' must be in [0, 1], got {self.int16_budget}")
        if self.int16_budget and not self.sensitivity:
            raise OptionError("'fake_quantize': option 'int16_budget' needs option 'sensitivity' "
                              "(a `graphopt sensitivity` JSON) to choose the points")
        if self.weight_rounding not in ("rtn", "gptq"):
            raise OptionError(f"'fake_quantize': option 'weight_rounding' must be 'rtn' or 'gptq', got '{self.weight_rounding}'")
        if self.weight_rounding == "gptq" and not self.activation_bits:
            raise OptionError("'fake_quantize': option 'weight_rounding' 'gptq' takes its Hessians from the activation "
                              "quantizers; it needs 'activation_bits' 8 or 16")
        if self.sensitivity and not Path(self.sensitivity).is_file():
            raise OptionError(f"'fake_quantize': option 'sensitivity': no such file '{self.sensitivity}'")

    def specs(self) -> tuple[QuantSpec, QuantSpec | None]:
        """Weight spec in torch layout (channel axis 0 of [out, in]) and activation spec."""
        weight = QuantSpec(dtype_for(self.weight_bits, self.weight_symmetric), self.weight_granularity,
                           axis=0 if self.weight_granularity == "channel" else None,
                           symmetric=self.weight_symmetric)
        if not self.activation_bits:
            return weight, None
        return weight, QuantSpec(dtype_for(self.activation_bits, self.activation_symmetric), "tensor",
                                 symmetric=self.activation_symmetric)

    def wide_inputs(self, model: Model) -> frozenset[str]:
        """Weights whose input gets 16 bits: those `int16_inputs` matches, then the activation points
        the sensitivity ranking puts first (matched by the weights they feed) up to the budget."""
        points = fake_quant.activation_points(model, self.skip)
        known = {w for feeds in points for w in feeds}
        unknown = [p for p in self.int16_inputs if not any(name_matches(w, (p,)) for w in known)]
        if unknown:
            raise OptionError(f"'fake_quantize': option 'int16_inputs': '{unknown[0]}' matches no weight of a "
                              f"quantized linear of '{model.name}'")
        chosen = {feeds for feeds in points if any(name_matches(w, self.int16_inputs) for w in feeds)}
        wide_weights = len(known) if self.weight_bits == 16 else len(known & set(self.int16_weights))
        budget = int16_budget_count(self.int16_budget, len(points), len(known), wide_weights, self.int16_budget_over)
        ranking = read_sensitivity(self.sensitivity, self.name) if self.sensitivity else []
        for row in (r for r in ranking if r["kind"] == "activation"):
            if len(chosen) >= budget:
                break
            named = {w.removesuffix(".T") for w in row["feeds"]}  # ONNX keeps a tied table as NAME.T
            chosen.update(feeds for feeds in points if named.intersection(feeds))
        return frozenset(w for feeds in chosen for w in feeds)

    def run_fx(self, model: Model, ctx: PassContext) -> PassResult:
        weight_spec, activation_spec = self.specs()
        wide = self.wide_inputs(model) if activation_spec is not None else frozenset()
        wide_spec = QuantSpec(dtype_for(16, self.activation_symmetric), "tensor", symmetric=self.activation_symmetric)
        weights = {w for feeds in fake_quant.activation_points(model, self.skip) for w in feeds}
        unknown = [w for w in self.int16_weights if w not in weights]
        if unknown and not fake_quant.fake_quant_modules(model):
            raise OptionError(f"'fake_quantize': option 'int16_weights': '{unknown[0]}' is not the weight of a "
                              f"quantized linear of '{model.name}'")
        inserted = fake_quant.insert_fake_quant(model, weight_spec, activation_spec, tuple(self.skip), wide, wide_spec,
                                         frozenset(self.int16_weights))
        if not inserted:
            return PassResult(model, False, {"weight_quantizers": 0, "activation_quantizers": 0})
        gptq = self.weight_rounding == "gptq"
        feeds = ctx.require_calib(self.name) if activation_spec is not None or gptq else ctx.calib
        fake_quant.calibrate(model, feeds, progress=ctx.progress, observer=self.observer, hessians=gptq)
        rounded = fake_quant.gptq_round_weights(model, progress=ctx.progress) if gptq else 0
        model.meta.extra["fake_quant"] = [
            {"module": name, "kind": m.kind, "name": m.name, "feeds": list(m.feeds), "dtype": m.spec.dtype}
            for name, m in fake_quant.fake_quant_modules(model).items()
        ]
        kinds = [m.kind for m in inserted]
        wide_kinds = [m.kind for m in inserted if m.spec.qmax > 255]
        wide_activations, wide_weights = wide_kinds.count("activation"), wide_kinds.count("weight")
        return PassResult(model, True, {"weight_quantizers": kinds.count("weight"),
                                        "activation_quantizers": kinds.count("activation"),
                                        "int16_activations": wide_activations,
                                        "int16_share": int16_share(wide_activations, kinds.count("activation"),
                                                                   wide_weights, kinds.count("weight")),
                                        "gptq_weights": rounded})
