"""awq: activation-aware per-input-channel weight scaling (AWQ), searched on calibration data, exact in float."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

from graphopt.analysis.capture import InputHessian, capture
from graphopt.errors import OptionError
from graphopt.ir import Model
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant import numerics
from graphopt.quant.scale_search import awq_scales
from graphopt.quant.smoothing import apply_scales, smoothable_points
from graphopt.quant.spec import QuantSpec, dtype_for

__all__ = ["AWQ"]


@register_pass
@dataclass(frozen=True)
class AWQ(Pass):
    """Scale the input channels of linear layers so that rounding their weights costs least output error.

    Reads calibration feeds (`ctx.calib`): the input Hessian H = 2/n·XᵀX of every point that
    `graphopt.quant.smoothing` can scale (one run of the float model; the `quantize` pass after it
    calibrates the scaled model again). For each point, the factors s = rms(X)^α, α searched on a
    grid of `steps` + 1 values in [0, 1] (graphopt.quant.scale_search.awq_scales), minimise the summed
    output error ‖X·W − (X/s)·Q(s·W)‖² of the weights reading it, Q rounding to nearest as
    `quantize` will with the same `weight_bits`, `weight_block_size` (0: per output channel),
    `weight_symmetric` and `weight_range`. Then X is divided by s in its producer and the weights'
    rows multiplied by s (graphopt.quant.smoothing's rules: an RMSNorm gain, SwiGLU's up_proj
    columns, a preceding MatMul's columns).
    Does NOT fire where no point can be scaled (attention's output before o_proj, an input shared
    with a tied embedding table), where `weights` matches no reader, or where α = 0 (plain
    rounding) is already best for every point: `changed` is False and the model is untouched.
    Guarantees: the graph computes the same function in float (relative output error ~1e-6 on
    the tiny Llama). Statistics: points scaled, and the mean searched α and error ratio.
    """

    name: ClassVar[str] = "awq"
    mutates_input: ClassVar[bool] = True

    weight_bits: int = field(default=4, metadata={"help": "bits of the weights quantize will write: 4 or 8"})
    weight_block_size: int = field(default=64, metadata={"help": "input rows per scale (0: one scale per output channel)"})
    weight_symmetric: bool = field(default=True, metadata={"help": "signed codes, zero point 0 (as quantize's option)"})
    weight_range: Literal["minmax", "mse"] = field(default="minmax", metadata={
        "help": "the rounding searched through: full range or MSE-optimal clipping (as quantize's option)"})
    steps: int = field(default=20, metadata={"help": "grid of alpha in [0, 1]: steps + 1 values"})
    weights: tuple[str, ...] = field(default=(), metadata={
        "help": "scale only the inputs of linears whose weight matches (names, globs, 're:...'); empty: every input"})

    def check(self) -> None:
        if self.weight_bits not in (4, 8):
            raise self.option_error("weight_bits", f" must be 4 or 8, got {self.weight_bits}")
        size = self.weight_block_size
        if size and (size < 2 or size & (size - 1)):
            raise self.option_error("weight_block_size", f" must be 0 or a power of two >= 2, got {size}")
        if not 1 <= self.steps <= 1000:
            raise self.option_error("steps", f" must be in [1, 1000], got {self.steps}")

    def option_error(self, option: str, problem: str) -> OptionError:
        return OptionError(f"'{self.name}': option '{option}'{problem}")

    def _spec(self) -> QuantSpec:
        dtype = dtype_for(self.weight_bits, self.weight_symmetric)
        if self.weight_block_size:
            return QuantSpec(dtype, "block", 0, self.weight_block_size, self.weight_symmetric)
        return QuantSpec(dtype, "channel", 1, symmetric=self.weight_symmetric)

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        spec = self._spec()
        tensors = model.graph.tensors()
        points = smoothable_points(model, self.weights)
        if not points:
            return PassResult(model, False, {"scaled": 0})
        calib = ctx.require_calib(self.name)
        hessians = capture(model, calib, [p.point for p in points], lambda _: InputHessian(), progress=ctx.progress,
                           desc="awq: calibrating")

        def fake_quant(w: np.ndarray) -> np.ndarray:
            if self.weight_range == "mse":
                return numerics.fake_quant(w, spec, *numerics.mse_params(w, spec))
            return numerics.fake_quant(w, spec)

        alphas, ratios = [], []
        for point in points:
            weights = [np.asarray(tensors[s.weight].values, np.float32) for s in point.sites]
            s, alpha, ratio = awq_scales(weights, hessians[point.point].hessian, fake_quant, self.steps)
            if alpha > 0:
                apply_scales(model, point, s)
                alphas.append(alpha)
                ratios.append(ratio)
        if not alphas:
            return PassResult(model, False, {"scaled": 0})
        return PassResult(model, True, {"scaled": len(alphas), "mean_alpha": round(float(np.mean(alphas)), 3),
                                        "mean_error_ratio": round(float(np.mean(ratios)), 4)})
