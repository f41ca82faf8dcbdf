"""Quantized linear layers: int8 weight-only (CPU) and float8 e4m3 (fp8 GPUs), drop-in for `nn.Linear`.

Both hold `weight` [out_features, in_features] in the quantized dtype, `weight_scale` (float32,
[out_features] per output channel, or [] per tensor; `Fp8Linear` also takes block scales,
[ceil(out / block_rows), ceil(in / block_cols)], one per tile of the weight) and an optional float
`bias`, with `weight ~= weight_q * weight_scale` broadcast over its rows (or tiles). They keep `in_features` / `out_features`, expose
`dequantized_weight(dtype)` (the float weight they stand for, for references and fallbacks) and
`linear_without_bias(x)` (what `pixtral.parallel.tensor_parallel.RowParallel` all-reduces
before it adds the bias).

Casting a model (`model.to(torch.bfloat16)`) leaves `weight` and `weight_scale` in their
dtypes (they move devices as usual); the bias follows the cast like any float parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127

_INT8_KERNEL = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
# `_weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) -> [M, N]` on the CPU: x 2-D, contiguous,
# float32 / bfloat16 / float16, and the scales in x's dtype (checked on torch 2.13).
_INT8_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class QuantizedLinear(nn.Module):
    """What both layers share: the parameters, the dequantized weight, the forward with bias."""

    quantized_dtype: torch.dtype

    block_size: tuple[int, int] | None = None  # (rows, columns) of a weight tile with one scale

    def __init__(self, in_features: int, out_features: int, bias: bool = False, per_channel: bool = True,
                 device=None, bias_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=self.quantized_dtype, device=device),
                                   requires_grad=False)
        scale_shape = (out_features,) if per_channel else ()
        self.weight_scale = nn.Parameter(torch.ones(scale_shape, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=bias_dtype or torch.float32, device=device),
                                  requires_grad=False) if bias else None)

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.dim() == 1

    @property
    def strategy(self) -> str:
        """"channel", "tensor" or "block": what one scale covers."""
        return "block" if self.block_size is not None else "channel" if self.per_channel else "tensor"

    def _weight_scales(self) -> torch.Tensor:
        """weight_scale in float32, broadcastable against the weight: [out, 1], [1, 1] or [out, in] for tiles."""
        if self.block_size is None:
            return self.weight_scale.float().reshape(-1, 1)
        rows, cols = self.block_size
        tiles = self.weight_scale.float().repeat_interleave(rows, 0).repeat_interleave(cols, 1)
        return tiles[: self.out_features, : self.in_features]  # the last tiles of a ragged weight are partial

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight: `weight_q` times its scale, computed in float32, then cast to `dtype`."""
        return (self.weight.float() * self._weight_scales()).to(dtype)

    def linear_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear_without_bias(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _apply(self, fn, recurse=True):
        # Keep the quantized weight and the float32 scales in their dtypes (a float8 tensor is a
        # floating-point one, so `model.to(bfloat16)` would otherwise widen it); move their device.
        for key in ("weight", "weight_scale", "input_scale"):
            t = self._parameters.get(key)
            if t is None:
                continue
            moved = fn(t)
            if moved.dtype != t.dtype:
                moved = t.to(device=moved.device)
            self._parameters[key] = nn.Parameter(moved, requires_grad=False)
        bias = self._parameters.get("bias")
        if bias is not None:
            self._parameters["bias"] = nn.Parameter(fn(bias), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        tiles = f" {self.block_size[0]}x{self.block_size[1]}" if self.block_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"per-{self.strategy}{tiles} scale")

    @classmethod
    def _empty_like(cls, linear: nn.Linear, per_channel: bool):
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None, per_channel=per_channel,
                   device=linear.weight.device, bias_dtype=linear.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = True):
        """The class's `quantize` of the linear's weight (the bias stays float)."""
        q, scale = cls.quantize(linear.weight, per_channel)
        new = cls._empty_like(linear, per_channel)
        new._set(q, scale, linear.bias)
        return new.train(linear.training)

    def _set(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = nn.Parameter(q.contiguous(), requires_grad=False)
        self.weight_scale = nn.Parameter(scale.float().contiguous(), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)


def _absmax(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    w = w.detach().float()
    return w.abs().amax(dim=1) if per_channel else w.abs().amax()


def quantize_int8(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: (int8 weight, float32 scale), scale = absmax / 127 per output row
    (or for the tensor); an all-zero row gets scale 1 and q = 0."""
    w = weight.detach().float()
    amax = _absmax(w, per_channel)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    div = scale.reshape(-1, 1) if per_channel else scale
    return torch.round(w / div).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_fp8(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale): scale = absmax / 448 per output row (or for the tensor); weight /
    scale, clamped to +-448, rounded to nearest e4m3 (an all-zero row: scale 1)."""
    w = weight.detach().float()
    amax = _absmax(w, per_channel)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    div = scale.reshape(-1, 1) if per_channel else scale
    return (w / div).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class Int8WeightLinear(QuantizedLinear):
    """int8 weights with per-output-channel float32 scales; activations stay in float.

    Forward: `torch.ops.aten._weight_int8pack_mm` on the CPU for float32/bfloat16/float16
    activations (the scales cast to the activations' dtype, as the kernel requires), else (other
    devices, dtypes, or a per-tensor scale, which is broadcast first) the weight dequantized on the
    fly and `F.linear`. The kernel is a matrix-vector one: its time grows with every row, so past
    `KERNEL_MAX_ROWS` rows (prompt chunks) the weight is converted to the activations' dtype
    (int8 values are exact there) for one matrix product, and the scales applied to its output:
    measured on a [14336, 5120] weight, 2 cores, bf16, the kernel takes 118 ms at 64 rows against
    128 ms converted, 265 against 136 at 128 rows, 1991 against 253 at 1024.
    """

    KERNEL_MAX_ROWS = 64

    quantized_dtype = torch.int8
    quantize = staticmethod(quantize_int8)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return (_INT8_KERNEL is not None and x.device.type == "cpu" and x.dtype in _INT8_KERNEL_DTYPES
                and self.weight.device.type == "cpu")

    def linear_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            return super().linear_without_bias(x)
        scales = self.weight_scale.to(x.dtype)
        if not self.per_channel:
            scales = scales.expand(self.out_features).contiguous()
        if x.numel() > self.KERNEL_MAX_ROWS * self.in_features:
            return F.linear(x, self.weight.to(x.dtype)) * scales
        x2 = x.reshape(-1, self.in_features).contiguous()
        out = _INT8_KERNEL(x2, self.weight, scales)
        return out.reshape(*x.shape[:-1], self.out_features)


class Fp8Linear(QuantizedLinear):
    """float8 e4m3 weights with a per-output-channel, a per-tensor or per-tile (block) float32 scale.

    Block scales (`block_size` = (rows, columns), as transformers' fine-grained fp8 and
    compressed-tensors' block strategy store them): `weight_scale` [ceil(out / rows), ceil(in /
    columns)], each scaling one tile of the weight; they always run dequantized (below).
    `input_scale` (float32 [], only when a checkpoint stores a static activation scale): the
    activations' e4m3 scale for the `_scaled_mm` path; the dequantized path keeps them in float.

    Forward on a CUDA GPU with fp8 support (compute capability >= 8.9: Ada, Hopper and later), for
    per-channel and per-tensor scales only: the activations quantized to e4m3 (dynamically per
    token, absmax / 448 per row, or with the static `input_scale`), and the product from
    `torch._scaled_mm` with row-wise scales (bfloat16 out, then cast to the activations' dtype) --
    when `in_features` and `out_features` are multiples of 16 (its layout needs; the weight,
    row-major [out, in], is passed transposed, i.e. column-major, as it wants). UNTESTED here (no
    fp8 GPU in CI): the path is written to torch's documented contract and is off when
    `use_scaled_mm` is False. Everywhere else (and for block scales) the weight is dequantized on
    the fly: `F.linear(x, (w_fp8.float() * scale).to(x.dtype))`.
    """

    quantized_dtype = FP8_DTYPE
    quantize = staticmethod(quantize_fp8)
    use_scaled_mm = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, per_channel: bool = True,
                 device=None, bias_dtype: torch.dtype | None = None, block_size: tuple[int, int] | None = None,
                 input_scale: bool = False):
        super().__init__(in_features, out_features, bias, per_channel, device, bias_dtype)
        if block_size is not None:
            rows, cols = block_size
            self.block_size = (int(rows), int(cols))
            shape = (-(-out_features // rows), -(-in_features // cols))
            self.weight_scale = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device), requires_grad=False)
        self.input_scale = (nn.Parameter(torch.ones((), dtype=torch.float32, device=device), requires_grad=False)
                            if input_scale else None)

    @property
    def per_channel(self) -> bool:
        return self.block_size is None and self.weight_scale.dim() == 1

    def uses_scaled_mm(self, x: torch.Tensor) -> bool:
        return (self.use_scaled_mm and self.block_size is None and x.is_cuda and hasattr(torch, "_scaled_mm")
                and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and self.in_features % 16 == 0 and self.out_features % 16 == 0
                and torch.cuda.get_device_capability(x.device) >= (8, 9))

    def linear_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_scaled_mm(x):
            return super().linear_without_bias(x)
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is None:
            xq, x_scale = quantize_fp8_per_token(x2)
        else:  # the checkpoint's static scale, as the engines that wrote it run it
            x_scale = self.input_scale.float().reshape(1, 1).expand(x2.shape[0], 1).contiguous()
            xq = (x2.float() / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).contiguous()
        w_scale = self.weight_scale.float().reshape(1, -1).expand(1, self.out_features).contiguous()
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `x` [M, K] as e4m3 (row-major) and their float32 scales [M, 1]: x ~= xq * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    xq = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).contiguous()
    return xq, scale
