"""upgrade_opset: take an ONNX model made at an older opset to the opset the passes need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from graphopt.errors import OptionError
from graphopt.frontends.onnx_opset import upgrade_opset
from graphopt.ir import MIN_OPSET, Model
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass

__all__ = ["UpgradeOpset"]


@register_pass
@dataclass(frozen=True)
class UpgradeOpset(Pass):
    """Upgrade the default-domain opset with onnx's version converter, checked numerically.

    Reads the first calibration feed when there is one (else the model's first sample input, else
    inputs synthesized from the declared shapes). Rules:

    1. A model below `opset` is converted (Upsample becomes Resize, Scatter ScatterElements, ...),
       its IR version raised to what the opset needs, and run against the original in onnxruntime
       on those inputs: every output within `graphopt.frontends.onnx_opset.ATOL` (relative) or
       the pass fails naming the output; an op the converter cannot adapt fails naming the op.
    2. A model at `opset` or later is left as it is: `changed` False.

    `graphopt convert` puts this step first when it loads an ONNX file below MIN_OPSET. Stats: the
    opsets, the largest relative difference and the cosine of the check, the ops replaced.
    """

    name: ClassVar[str] = "upgrade_opset"
    mutates_input: ClassVar[bool] = False

    opset: int = field(default=MIN_OPSET, metadata={"help": f"target opset (>= {MIN_OPSET})"})

    def check(self) -> None:
        if self.opset < MIN_OPSET:
            raise OptionError(f"pass 'upgrade_opset': option 'opset' must be >= {MIN_OPSET} (the passes' opset), "
                              f"got {self.opset}")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        feeds = (ctx.calib or model.sample_inputs or [None])[0]
        upgraded, record = upgrade_opset(model, self.opset, feeds)
        return PassResult(upgraded, upgraded is not model, record.stats() if upgraded is not model else {})
