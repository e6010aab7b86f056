"""smooth_quant: SmoothQuant's migration of activation outliers into the weights, exact in float."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from graphopt.analysis.capture import capture
from graphopt.errors import OptionError
from graphopt.ir import Model
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant import numerics
from graphopt.quant.observers import MinMaxObserver
from graphopt.quant.smoothing import apply_scales, smoothable_points

__all__ = ["SmoothQuant"]


@register_pass
@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Move activation outliers into the weights that read them (SmoothQuant, Xiao et al. 2023).

    Reads calibration feeds (`ctx.calib`): the per-channel max |X_j| of every smoothable point
    (one run of the float model; the `quantize` pass after it calibrates the smoothed model again,
    a second run, because its observers need the smoothed values). For each activation X read only
    by MatMul layers with constant [in, out] weights that nothing else reads (with `weights`, only
    the inputs of linears whose weight matches), the factors s_j = max|X_j|^α / max|W_j|^(1−α)
    (numerics.smooth_scales) divide X and multiply the weights' rows j. Dividing X is folded
    into its producer (graphopt.quant.smoothing):
      1a. a Mul by a constant vector (an RMSNorm / LayerNorm gain) that only the Mul reads;
      1b. a Mul of a MatMul output that only the Mul reads (SwiGLU's up_proj): that weight's columns;
      1c. a MatMul with a constant weight only it reads: its columns.
    Does NOT fire where the producer is anything else (attention's output before o_proj), where
    X or a weight has readers outside the match (a residual add), or on a quantized graph:
    `changed` is False and the model is untouched.
    Guarantees: the graph computes the same function in float; outputs agree within float32
    rounding (relative error about 1e-6 on the tiny Llama). Leaves no metadata.
    """

    name: ClassVar[str] = "smooth_quant"
    mutates_input: ClassVar[bool] = True

    alpha: float = field(default=0.5, metadata={"help": "migration strength in (0, 1]: the share of the "
                                                         "activation range moved into the weights"})
    weights: tuple[str, ...] = field(default=(), metadata={
        "help": "smooth only the inputs of linears whose weight matches (names, globs, 're:...'); empty: every input"})

    def check(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise OptionError(f"'smooth_quant': option 'alpha' must be in (0, 1], got {self.alpha}")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        points = smoothable_points(model, self.weights)
        if not points:
            return PassResult(model, False, {"smoothed": 0})
        calib = ctx.require_calib(self.name)
        ranges = capture(model, calib, [p.point for p in points], lambda _: MinMaxObserver(axis=-1),
                         progress=ctx.progress, desc="smooth_quant: calibrating")
        tensors = model.graph.tensors()
        for point in points:
            lo, hi = ranges[point.point].range()
            weight_max = np.max([np.abs(tensors[s.weight].values).max(axis=1) for s in point.sites], axis=0)
            apply_scales(model, point, numerics.smooth_scales(np.maximum(-lo, hi), weight_max, self.alpha))
        return PassResult(model, True, {"smoothed": len(points)})
