"""Quantization: specs, numerics, observers, GPTQ, QDQ, encodings I/O, rotations, the quantization plan."""

from graphopt.quant.numerics import dequantize, fake_quant, params_for, quantize, scale_zero_point
from graphopt.quant.spec import QuantSpec, dtype_for

__all__ = ["QuantSpec", "dtype_for", "scale_zero_point", "params_for", "quantize", "dequantize", "fake_quant"]
