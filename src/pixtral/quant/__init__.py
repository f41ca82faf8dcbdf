"""Quantized weights: fp8 (e4m3) and int8 weight-only linear layers, swapping them into a model, and the
fp8 checkpoint formats.

A package (not one module in `pixtral.model`) because quantization grows beyond the layers: the
layers here (`linear`), the swap into a model (`apply`), what pre-quantized checkpoints' configs
declare (`formats`; the loader, `pixtral.checkpoint`, reads their tensors) and the layout `pixtral
convert --quantization fp8` writes (`compressed_tensors`); the model's own code (`pixtral.model`)
stays float. docs/quantization.md describes the formats.
"""

from pixtral.quant.apply import DECODER_LINEARS, SCHEMES, quantize_linears, replace_linear
from pixtral.quant.linear import (FP8_DTYPE, FP8_MAX, Fp8Linear, Int8WeightLinear, QuantizedLinear, quantize_fp8,
                                  quantize_fp8_per_token, quantize_int8)

__all__ = ["DECODER_LINEARS", "FP8_DTYPE", "FP8_MAX", "Fp8Linear", "Int8WeightLinear", "QuantizedLinear", "SCHEMES",
           "quantize_fp8", "quantize_fp8_per_token", "quantize_int8", "quantize_linears", "replace_linear"]
