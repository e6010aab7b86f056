"""fake_quantize: trainable fake-quant (STE, learnable scales) at every linear weight and input, FX form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.ir import Model
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant.plan import QuantOptions, check_weight_patterns, folded_gains, plan_int16
from graphopt.training import fake_quant

__all__ = ["FakeQuantize"]


@register_pass
@dataclass(frozen=True)
class FakeQuantize(QuantOptions, Pass):
    """Insert trainable fake quantizers into the torch.export graph, for quantization-aware training.

    Reads: calibration feeds (`ctx.calib`) for activation ranges; without activations, weights
    alone calibrate from the model's sample inputs. The options are `graphopt.quant.plan.QuantOptions`,
    shared with `quantize`: the same settings make the same grids and the same 16-bit points.
    Rules:
      1. Every `aten.linear` whose weight is a parameter gets a weight quantizer after the
         parameter read (`weight_bits`, per output channel or per tensor; 16 bits per channel for
         weights matching `int16_weights`); a tied embedding table is one quantizer serving the
         lookup and the lm_head alike, at `embedding_bits` when set. Untied embedding tables are
         not linear weights here and stay float (the ONNX pass quantizes them).
      2. The activation entering those linears gets one per-tensor quantizer per distinct tensor
         (`activation_bits`; 0 keeps activations float), rewired into the linears only — a
         residual add reading the same tensor stays float.
      3. Weights matching `exclude` keep weight and input float.
      4. After calibration, `plan_int16` picks the 16-bit activation points as the quantize pass
         does: inputs of weights matching `int16_inputs`, then up to `int16_budget` by the
         `sensitivity` ranking or, without one, by the estimated SQNR of each point's calibration
         statistics (its observer's `sqnr_db`, the quantize pass's proxy).
      5. A model that already holds quantizers, or has no linear layer, is left untouched.
      6. `weight_rounding` "gptq": after calibration, linear weights (not embedding tables) are
         replaced by their GPTQ rounding on their quantizer's grid (`weight_range`), from the
         float model's input Hessians over the calibration feeds, as the quantize pass's GPTQ;
         training then starts from those weights.
    Refuses (OptionError naming the option) what the FX form cannot do: block granularity, and
    GPTQ without activation quantizers (their observation collects the Hessians).
    Guarantees: scales start where the quantize pass puts them (activations: `observer`'s range;
    weights: min-max or `weight_range` "mse"), so the fake-quant model computes what the static
    QDQ model with those scales computes; with the quantizers switched off
    (`fake_quant.set_fake_quant(model, False)`) it is the float model exactly.
    Leaves: model.meta.extra["fake_quant"], one record per quantizer (module, kind, name, feeds);
    `graphopt.training.distillation.train` fine-tunes, `fake_quant.export_encodings` writes the scales.
    """

    name: ClassVar[str] = "fake_quantize"
    mutates_input: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        if self.weight_granularity == "block":
            raise self.option_error("weight_granularity", ": 'block' is not supported in the FX form (tensor, channel); "
                                    "quantize blocks with the ONNX 'quantize' pass")
        for option in ("weight_offset", "embedding_block_size", "half_scales"):
            if getattr(self, option):
                raise self.option_error(option, " is not supported in the FX form; use the ONNX 'quantize' pass")
        if self.weight_rounding == "gptq" and not self.activation_bits:
            raise self.option_error("weight_rounding", ": 'gptq' takes its Hessians from the activation quantizers; "
                                    "it needs 'activation_bits' 8 or 16")

    def run_fx(self, model: Model, ctx: PassContext) -> PassResult:
        points = fake_quant.activation_points(model, self.exclude)
        if fake_quant.fake_quant_modules(model) or not points:
            return PassResult(model, False, {"weight_quantizers": 0, "activation_quantizers": 0})
        weights = {w for feeds in points for w in feeds}
        folded = folded_gains(model.meta)
        check_weight_patterns(self, weights, model.name, folded)
        tables = fake_quant.table_weights(model)
        inserted = fake_quant.insert_fake_quant(
            model, lambda name: self.weight_spec(name, 0, table=name in tables),
            self.activation_spec() if self.activation_bits else None, self.exclude)
        gptq = self.weight_rounding == "gptq"
        feeds = ctx.require_calib(self.name) if self.activation_bits or gptq else ctx.calib
        fake_quant.observe(model, feeds, observer=self.observer, percentile=self.percentile, hessians=gptq,
                           progress=ctx.progress)
        activations = [m for m in inserted if m.kind == "activation"]
        proxy_spec = self.activation_spec(8)
        plan = plan_int16(self, [m.feeds for m in activations], weights, model.name,
                          proxy=lambda: [m.observer.sqnr_db(proxy_spec) for m in activations], folded=folded)
        for index in plan.wide:
            activations[index].spec = self.activation_spec(16)
        fake_quant.set_ranges(model, weight_range=self.weight_range)
        rounded = fake_quant.gptq_round_weights(model, grid=self.weight_range, progress=ctx.progress) if gptq else 0
        model.meta.extra["fake_quant"] = [
            {"module": name, "kind": m.kind, "name": m.name, "feeds": list(m.feeds), "dtype": m.spec.dtype}
            for name, m in fake_quant.fake_quant_modules(model).items()
        ]
        return PassResult(model, True, {"weight_quantizers": len(inserted) - len(activations),
                                        "activation_quantizers": len(activations),
                                        "int16_activations": len(plan.wide), "int16_share": plan.share,
                                        "gptq_weights": rounded})
