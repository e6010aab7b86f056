"""fake_quantize: trainable fake-quant (STE, learnable scales) at every linear weight and input, FX form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from graphopt import qat
from graphopt.errors import OptionError
from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult, register_pass
from graphopt.quant.spec import QuantSpec, dtype_for

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
      3. Weights named in `skip` (parameter names) keep weight and input float.
      4. A model that already holds quantizers, or has no linear layer, is left untouched.
    Guarantees: scales start at min-max of calibration (numerics.scale_zero_point), so the
    fake-quant model computes what a static QDQ model with those scales computes; with the
    quantizers switched off (`qat.set_fake_quant(model, False)`) it is the float model exactly.
    Leaves: model.meta.extra["fake_quant"], one record per quantizer (module, kind, name, feeds);
    `graphopt.qat.train` fine-tunes, `graphopt.qat.export_encodings` writes the scales.
    """

    name = "fake_quantize"

    weight_bits: int = field(default=8, metadata={"help": "4, 8 or 16"})
    weight_granularity: Literal["channel", "tensor"] = "channel"
    weight_symmetric: bool = True
    activation_bits: int = field(default=8, metadata={"help": "0 (float), 8 or 16"})
    activation_symmetric: bool = False
    skip: tuple[str, ...] = field(default=(), metadata={"help": "weight names kept float (with their input)"})

    def check(self) -> None:
        if self.weight_bits not in (4, 8, 16):
            raise OptionError(f"'fake_quantize': option 'weight_bits' must be 4, 8 or 16, got {self.weight_bits}")
        if self.activation_bits not in (0, 8, 16):
            raise OptionError(
                f"'fake_quantize': option 'activation_bits' must be 0, 8 or 16, got {self.activation_bits}")

    def specs(self) -> tuple[QuantSpec, QuantSpec | None]:
        """Weight spec in torch layout (channel axis 0 of [out, in]) and activation spec."""
        weight = QuantSpec(dtype_for(self.weight_bits, self.weight_symmetric), self.weight_granularity,
                           axis=0 if self.weight_granularity == "channel" else None,
                           symmetric=self.weight_symmetric)
        if not self.activation_bits:
            return weight, None
        return weight, QuantSpec(dtype_for(self.activation_bits, self.activation_symmetric), "tensor",
                                 symmetric=self.activation_symmetric)

    def run_fx(self, model: Model, ctx: PassContext) -> PassResult:
        weight_spec, activation_spec = self.specs()
        inserted = qat.insert_fake_quant(model, weight_spec, activation_spec, tuple(self.skip))
        if not inserted:
            return PassResult(model, False, {"weight_quantizers": 0, "activation_quantizers": 0})
        feeds = ctx.require_calib(self.name) if activation_spec is not None else ctx.calib
        qat.calibrate(model, feeds, progress=ctx.progress)
        model.meta.extra["fake_quant"] = [
            {"module": name, "kind": m.kind, "name": m.name, "feeds": list(m.feeds), "dtype": m.spec.dtype}
            for name, m in qat.fake_quant_modules(model).items()
        ]
        kinds = [m.kind for m in inserted]
        return PassResult(model, True, {"weight_quantizers": kinds.count("weight"),
                                        "activation_quantizers": kinds.count("activation")})
