"""Quantized weights: fp8 (e4m3) and int8 weight-only linear layers, and swapping them into a model.

A package (not one module in `pixtral.model`) because quantization grows beyond the layers: the
layers here (`linear`), the swap into a model (`apply`), and later the loading of quantized
checkpoints and the kernels; the model's own code (`pixtral.model`) stays float.
"""

from pixtral.quant.apply import DECODER_LINEARS, SCHEMES, quantize_linears
from pixtral.quant.linear import FP8_DTYPE, FP8_MAX, Fp8Linear, Int8WeightLinear, quantize_fp8_per_token

__all__ = ["DECODER_LINEARS", "FP8_DTYPE", "FP8_MAX", "Fp8Linear", "Int8WeightLinear", "SCHEMES",
           "quantize_fp8_per_token", "quantize_linears"]
