"""Quantization core: specs, numerics, observers (and GPTQ); encodings I/O is graphopt.encodings."""

from graphopt.quant.spec import QuantSpec, dtype_for
from graphopt.quant.numerics import dequantize, fake_quant, params_for, quantize, scale_zero_point

__all__ = ["QuantSpec", "dtype_for", "scale_zero_point", "params_for", "quantize", "dequantize", "fake_quant"]
