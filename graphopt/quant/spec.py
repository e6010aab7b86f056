"""QuantSpec: what a quantizer produces (integer type, granularity, symmetry), with its integer grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx

from graphopt.errors import OptionError

__all__ = ["QuantSpec", "DTYPES", "GRANULARITIES", "dtype_for"]

DTYPES = ("int4", "uint4", "int8", "uint8", "int16", "uint16")
GRANULARITIES = ("tensor", "channel", "block", "token")

_ONNX_TYPES = {
    "int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4,
    "int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8,
    "int16": onnx.TensorProto.INT16, "uint16": onnx.TensorProto.UINT16,
}


def dtype_for(bits: int, symmetric: bool) -> str:
    """The integer type graphopt uses for `bits`: signed when symmetric (zero point 0), unsigned
    otherwise. This is the convention the encodings files rely on (see graphopt.quant.encodings)."""
    if bits not in (4, 8, 16):
        raise OptionError(f"bit width must be 4, 8 or 16, got {bits}")
    return f"{'' if symmetric else 'u'}int{bits}"


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    dtype: integer type of the codes (int4/uint4/int8/uint8/int16/uint16).
    granularity: "tensor" (one scale), "channel" (one per index of `axis`), "block" (one per
      `block_size` consecutive elements along `axis`, per index of the other axes) or "token"
      (dynamic: one scale per row of the last axis, computed at run time; fake-quant only).
    axis: the channel axis ("channel") or the blocked axis ("block"); negative counts from the end.
    symmetric: zero point fixed at the middle of the grid (0 for signed types), scale from max |x|.
    """

    dtype: Literal["int4", "uint4", "int8", "uint8", "int16", "uint16"] = "int8"
    granularity: Literal["tensor", "channel", "block", "token"] = "tensor"
    axis: int | None = None
    block_size: int = 0
    symmetric: bool = True

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise OptionError(f"QuantSpec: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.granularity not in GRANULARITIES:
            raise OptionError(
                f"QuantSpec: granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity in ("channel", "block") and self.axis is None:
            raise OptionError(f"QuantSpec: granularity '{self.granularity}' needs an axis")
        if self.granularity == "block" and self.block_size < 2:
            raise OptionError(f"QuantSpec: granularity 'block' needs block_size >= 2, got {self.block_size}")
        if self.granularity != "block" and self.block_size:
            raise OptionError(f"QuantSpec: block_size {self.block_size} given for granularity '{self.granularity}'")

    @property
    def bits(self) -> int:
        return int(self.dtype.lstrip("uint"))

    @property
    def signed(self) -> bool:
        return not self.dtype.startswith("u")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy type that holds the codes (ml_dtypes int4/uint4 for 4-bit, as onnx does)."""
        if self.bits == 4:
            import ml_dtypes

            return np.dtype(ml_dtypes.int4 if self.signed else ml_dtypes.uint4)
        return np.dtype(self.dtype)

    @property
    def onnx_type(self) -> int:
        return _ONNX_TYPES[self.dtype]
