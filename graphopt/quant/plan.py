"""The quantization plan: the options PTQ (`quantize`, ONNX) and QAT (`fake_quantize`, FX) share,
and the one decision of which activation points are kept at 16 bits.

A point is named the way both forms can name it: by the linear weights the activation feeds.
Parameter names survive lowering; a tied embedding / lm_head table, which the ONNX form keeps
transposed as `NAME.T`, is the same weight as FX's `NAME` (`weight_key`). Both passes list their
points as the weights each feeds, hand them to `plan_int16`, and so make the same choice for the
same model and options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Collection, Literal, Sequence

import numpy as np

from graphopt.analysis.sensitivity import read_sensitivity
from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir.names import name_matches
from graphopt.quant.spec import QuantSpec, dtype_for

__all__ = ["QuantOptions", "Int16Plan", "plan_int16", "check_weight_patterns", "folded_gains", "FOLDED_GAINS",
           "weight_key", "weight_matches", "int16_budget_count", "int16_share"]


def weight_key(name: str) -> str:
    """A weight's name as both forms know it: the ONNX form's transposed tied table `NAME.T` is FX's `NAME`."""
    return name.removesuffix(".T")


def weight_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a weight matches one of `patterns` (names, globs, 're:...'), under its own name or its `weight_key`."""
    return bool(patterns) and (name_matches(name, patterns) or name_matches(weight_key(name), patterns))


@dataclass(frozen=True)
class QuantOptions:
    """The options `quantize` and `fake_quantize` share: same names, same defaults, same meaning.

    A pass inherits them (`class Quantize(QuantOptions, Pass)`), so recipes and `graphopt passes`
    list them identically; `check()` validates what both forms accept, and a pass refuses in its
    own `check()` (calling this one first) what its form cannot honour, naming the option.
    """

    name: ClassVar[str] = ""

    weight_bits: int = field(default=8, metadata={"help": "4, 8 or 16"})
    weight_granularity: Literal["tensor", "channel", "block"] = field(default="channel", metadata={"help": "weight scales"})
    weight_block_size: int = field(default=64, metadata={"help": "input rows per scale when weight_granularity is block"})
    # asymmetric uint8 by default: ONNX Runtime's AVX2 (non-VNNI) u8s8 integer kernels saturate
    # their int16 pair sums (SmolLM2's perplexity explodes); u8u8 does not. Symmetric-int8 NPUs set this true.
    weight_symmetric: bool = field(default=False, metadata={"help": "signed codes, zero point 0"})
    weight_range: Literal["minmax", "mse"] = field(default="minmax", metadata={"help": "weight clipping: full range or MSE-optimal"})
    weight_rounding: Literal["rtn", "gptq"] = field(default="rtn", metadata={"help": "round to nearest, or GPTQ (needs calibration)"})
    weight_offset: bool = field(default=False, metadata={
        "help": "asymmetric MatMul weights as code * scale + a float offset per scale group (the exact min-max "
                "range, as GGUF Q4_1 and MLX store them) instead of an integer zero point"})
    half_scales: bool = field(default=False, metadata={
        "help": "weight scales (and offsets) rounded to float16 before the codes are chosen, as GGUF stores "
                "them: store_half then keeps them at half the bytes, exactly"})
    embedding_bits: int = field(default=0, metadata={"help": "bits of embedding tables (0: weight_bits); per channel"})
    embedding_block_size: int = field(default=0, metadata={
        "help": "embedding tables in symmetric blocks of this many elements along each row (0: per channel)"})
    activation_bits: int = field(default=8, metadata={"help": "8 or 16; 0 leaves activations float (weight-only)"})
    activation_symmetric: bool = field(default=False, metadata={"help": "signed activations, zero point 0"})
    observer: Literal["minmax", "percentile", "mse"] = field(default="minmax", metadata={"help": "activation range"})
    percentile: float = field(default=99.99, metadata={"help": "for observer: percentile"})
    int16_inputs: tuple[str, ...] = field(default=(), metadata={
        "help": "weights (names, globs, 're:...') whose input activation is kept at 16 bits"})
    int16_weights: tuple[str, ...] = field(default=(), metadata={
        "help": "weights (names, globs, 're:...') quantized at 16 bits per channel"})
    int8_weights: tuple[str, ...] = field(default=(), metadata={
        "help": "weights (names, globs, 're:...') quantized at 8 bits per channel, whatever weight_bits "
                "(a 4-bit recipe's most sensitive few)"})
    int16_budget: float = field(default=0.0, metadata={"help": "fraction of points at 16 bits (see int16_budget_over)"})
    int16_budget_over: Literal["activations", "points"] = field(default="activations", metadata={
        "help": "what int16_budget is a fraction of: 'activations' (activation points) or 'points' "
                "(activations and weights; 16-bit weights count against it)"})
    sensitivity: str = field(default="", metadata={
        "file": True, "help": "`graphopt sensitivity` JSON ranking the points (else an SQNR proxy ranks them)"})
    exclude: tuple[str, ...] = field(default=(), metadata={
        "help": "weights (names, globs, 're:...') left float, with their input unless a quantized linear reads it too"})

    def option_error(self, option: str, problem: str) -> OptionError:
        """An OptionError naming this pass and `option`; `problem` follows the option's name."""
        return OptionError(f"'{self.name or 'quantization'}': option '{option}'{problem}")

    def check(self) -> None:
        if self.weight_bits not in (4, 8, 16):
            raise self.option_error("weight_bits", f" must be 4, 8 or 16, got {self.weight_bits}")
        if self.embedding_bits not in (0, 4, 8, 16):
            raise self.option_error("embedding_bits", f" must be 0, 4, 8 or 16, got {self.embedding_bits}")
        if self.activation_bits not in (0, 8, 16):
            raise self.option_error("activation_bits", f" must be 0, 8 or 16, got {self.activation_bits}")
        size = self.weight_block_size
        if self.weight_granularity == "block" and (size < 2 or size & (size - 1)):
            raise self.option_error("weight_block_size", f" must be a power of two >= 2, got {size}")
        size = self.embedding_block_size
        if size and (size < 2 or size & (size - 1)):
            raise self.option_error("embedding_block_size", f" must be 0 or a power of two >= 2, got {size}")
        if self.weight_offset and self.weight_symmetric:
            raise self.option_error("weight_offset", " needs asymmetric weights: set weight_symmetric false")
        if self.weight_offset and self.weight_granularity == "tensor":
            raise self.option_error("weight_offset", " needs weight scales per channel or per block")
        if not 0.0 <= self.int16_budget <= 1.0:
            raise self.option_error("int16_budget", f" must be in [0, 1], got {self.int16_budget}")
        if not 50.0 < self.percentile <= 100.0:
            raise self.option_error("percentile", f" must be in (50, 100], got {self.percentile}")
        if self.sensitivity:
            if not Path(self.sensitivity).is_file():
                raise self.option_error("sensitivity", f": no such file '{self.sensitivity}'")
            _read_ranking(self)  # a malformed file fails when the recipe is read, not after calibration

    # ------------------------------------------------------------------------------ specs
    def activation_spec(self, bits: int | None = None) -> QuantSpec:
        """The per-tensor spec of an activation point at `bits` (default `activation_bits`)."""
        bits = bits or self.activation_bits
        return QuantSpec(dtype_for(bits, self.activation_symmetric), "tensor", symmetric=self.activation_symmetric)

    def weight_spec(self, name: str, channel_axis: int, *, table: bool = False,
                    block_axis: int | None = None) -> QuantSpec:
        """The spec of weight `name` with its output channels on `channel_axis`: 16 bits per channel
        when `int16_weights` names it, 8 bits per channel when `int8_weights` does, `embedding_bits` per channel for an embedding `table`, else
        `weight_bits` at `weight_granularity` (blocks of `weight_block_size` along `block_axis`; when
        the block does not divide that axis the last block is shorter, as ONNX's blocked
        DequantizeLinear and MatMulNBits take it); a table with `embedding_block_size` gets
        symmetric blocks of that size along `block_axis`."""
        symmetric = self.weight_symmetric
        for bits, patterns in ((16, self.int16_weights), (8, self.int8_weights)):
            if weight_matches(name, patterns):
                return QuantSpec(dtype_for(bits, symmetric), "channel", channel_axis, symmetric=symmetric)
        if table and self.embedding_block_size:
            bits = self.embedding_bits or self.weight_bits
            return self._block_spec(name, dtype_for(bits, True), block_axis, "embedding_block_size", True)
        if table and self.embedding_bits:
            return QuantSpec(dtype_for(self.embedding_bits, symmetric), "channel", channel_axis, symmetric=symmetric)
        dtype = dtype_for(self.weight_bits, symmetric)
        if self.weight_granularity == "tensor":
            return QuantSpec(dtype, "tensor", symmetric=symmetric)
        if self.weight_granularity == "channel":
            return QuantSpec(dtype, "channel", channel_axis, symmetric=symmetric)
        return self._block_spec(name, dtype, block_axis, "weight_block_size", symmetric)

    def _block_spec(self, name: str, dtype: str, axis: int | None, option: str, symmetric: bool) -> QuantSpec:
        if axis is None:
            raise UnsupportedGraphError(f"'{self.name}': option '{option}': weight '{name}' has no input axis "
                                        "to quantize in blocks along")
        return QuantSpec(dtype, "block", axis, getattr(self, option), symmetric)

    def excluded(self, weight: str) -> bool:
        """Whether `exclude` leaves this weight (and the input only it reads) float."""
        return weight_matches(weight, self.exclude)


# -------------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class Int16Plan:
    """Which activation points are at 16 bits (indexes into the points given to `plan_int16`),
    and the 16-bit share counted both ways, as pass statistics (`int16_share`)."""

    wide: frozenset[int]
    share: dict


def int16_budget_count(fraction: float, activations: int, weights: int, wide_weights: int,
                       over: str = "activations") -> int:
    """How many activation points a 16-bit budget of `fraction` buys: that fraction of the
    `activations` points (over "activations"), or of every quantized point, activations and weights,
    less the `wide_weights` already at 16 bits (over "points")."""
    if over == "activations":
        return int(np.floor(fraction * activations + 1e-9))
    return max(0, int(np.floor(fraction * (activations + weights) + 1e-9)) - wide_weights)


def int16_share(wide_activations: int, activations: int, wide_weights: int, weights: int) -> dict:
    """The 16-bit points counted both ways, as pass statistics: {"activations": [wide, of], "points": [wide, of]}."""
    return {"activations": [wide_activations, activations],
            "points": [wide_activations + wide_weights, activations + weights]}


FOLDED_GAINS = "folded_gains"  # model.meta.extra key: gain matrices a rotation folded into their readers


def folded_gains(meta) -> tuple[str, ...]:
    """The names of the gain matrices a rotation (`rotate`) folded into the linears reading them instead
    of keeping them as weights (an untied lm_head takes the final norm's gain): recorded in `meta.extra`."""
    return tuple(meta.extra.get(FOLDED_GAINS, ()))


def check_weight_patterns(options: QuantOptions, weights: Collection[str], model_name: str,
                          folded: Collection[str] = ()) -> None:
    """Every `int16_inputs`, `int16_weights` and `int8_weights` pattern must match a quantized linear
    weight of the model, or a gain matrix in `folded` (`folded_gains`: nothing left to keep wide, as
    where a recipe for tied models names the gain an untied model's lm_head absorbed); OptionError
    naming the option and the pattern otherwise. Cheap: passes call it before calibrating."""
    for option in ("int16_inputs", "int16_weights", "int8_weights"):
        for pattern in getattr(options, option):
            if not any(weight_matches(w, (pattern,)) for w in [*weights, *folded]):
                raise options.option_error(
                    option, f": '{pattern}' matches no weight of a quantized linear layer of '{model_name}'")


def _read_ranking(options: QuantOptions) -> list[dict]:
    return read_sensitivity(options.sensitivity, options.name or "quantization")


def plan_int16(options: QuantOptions, points: Sequence[Sequence[str]], weights: Collection[str], model_name: str,
               proxy: Callable[[], Sequence[float]], folded: Collection[str] = ()) -> Int16Plan:
    """Choose the activation points kept at 16 bits. `points` are the quantized activation points,
    each as the weights it feeds (empty when activations stay float); `weights` every quantized
    linear weight. In order:

    1. `activation_bits` 16: every point (nothing more to choose).
    2. The points feeding a weight that `int16_inputs` matches, whatever the budget.
    3. Up to the budget (`int16_budget_count`): the activation rows of the `sensitivity` ranking,
       most sensitive first, each taking the points that feed one of the weights the row feeds
       (tied tables by `weight_key`); rows that feed no weight here (attention MatMul inputs) are
       skipped. Without a ranking file, `proxy()` gives each point's estimated SQNR at 8 bits
       (`MinMaxObserver.sqnr_db` of its calibration statistics), and the lowest come first.

    `proxy` is called only when step 3 needs it. Raises OptionError when a pattern matches no weight
    (`check_weight_patterns`, `folded` as there) or when the budget needs a ranking whose rows feed none of these
    weights (a ranking of another model).
    """
    check_weight_patterns(options, weights, model_name, folded)
    wide_weights = len(weights) if options.weight_bits == 16 else sum(
        weight_matches(w, options.int16_weights) for w in weights)
    keys = [{weight_key(w) for w in feeds} for feeds in points]
    if options.activation_bits == 16:
        chosen = list(range(len(points)))
    else:
        chosen = [i for i, feeds in enumerate(points) if any(weight_matches(w, options.int16_inputs) for w in feeds)]
        budget = int16_budget_count(options.int16_budget, len(points), len(weights), wide_weights,
                                    options.int16_budget_over)
        if budget > len(chosen):
            for i in _ranked(options, keys, model_name, proxy):
                if len(chosen) >= budget:
                    break
                if i not in chosen:
                    chosen.append(i)
    return Int16Plan(frozenset(chosen), int16_share(len(chosen), len(points), wide_weights, len(weights)))


def _ranked(options: QuantOptions, keys: list[set[str]], model_name: str, proxy) -> list[int]:
    """Point indexes, most sensitive first: by the ranking file, else by the proxy."""
    if not options.sensitivity:
        estimates = list(proxy())
        return sorted(range(len(keys)), key=lambda i: estimates[i])
    order: list[int] = []
    for row in _read_ranking(options):
        if row["kind"] != "activation":
            continue
        fed = {weight_key(w) for w in row["feeds"]}
        order += [i for i, point in enumerate(keys) if fed & point and i not in order]
    if not order and keys:
        raise options.option_error(
            "sensitivity", f": no activation row of '{options.sensitivity}' feeds a quantized weight of "
                           f"'{model_name}' (a ranking of another model?)")
    return order
