"""Fused elementwise kernels for inference on the GPU (Triton): RMSNorm, residual add + RMSNorm,
rotary embedding, and the SiLU gate.

Written eagerly, each of these is several kernels with float32 temporaries: RMSNorm casts up,
normalises, casts back and scales (four passes over the activations), RoPE casts up, multiplies
as complex numbers and casts back. In a decode step these are a few microseconds each, 40 layers
deep, about as long as the matrix products of a small batch; in a long prefill they are extra
passes over large activations. Each function here is one kernel that keeps the reference's
rounding points (normalise in float32, round to the activation dtype, then scale; the SiLU
rounded before the product), so results match the eager code up to float32 arithmetic order.

Every function falls back to the eager computation when the kernels cannot run: no Triton, a
CPU tensor (unless `TRITON_INTERPRET=1`, how the tests run them), gradients being recorded for
one of the tensors (training), or a shape the kernel does not tile.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pixtral.model.layers import rms_norm as rms_norm_eager
from pixtral.model.rope import apply_rotary as rotary_eager

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs
    triton = None


def _usable(*tensors: torch.Tensor) -> bool:
    if triton is None or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return False  # the kernels have no backward
    return tensors[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, R, H, Y, W, stride_x, stride_r, stride_h, stride_y, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows x stride passes 2**31 in long prefills
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:  # h = x + r, rounded to the activation dtype as the eager add does
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + row * stride_h + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        normed = (xf * inv).to(X.dtype.element_ty).to(tl.float32)  # the reference's cast back, then scale
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(X, ROT, OUT, stride_xt, stride_xh, stride_rt, stride_ot, stride_oh, n_heads,
                       HALF: tl.constexpr, HEADS: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        p = tl.arange(0, HALF)
        mask = (h < n_heads)[:, None]
        src = X + t * stride_xt + h[:, None] * stride_xh + 2 * p[None, :]
        re = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        im = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(ROT + t * stride_rt + 2 * p)[None, :]
        sin = tl.load(ROT + t * stride_rt + 2 * p + 1)[None, :]
        dst = OUT + t * stride_ot + h[:, None] * stride_oh + 2 * p[None, :]
        tl.store(dst, (re * cos - im * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(dst + 1, (re * sin + im * cos).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, stride_g, stride_o, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(GU + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(GU + row * stride_g + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty).to(tl.float32)  # eager rounds here
        tl.store(OUT + row * stride_o + cols, (silu * up).to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- fused entry points
def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as a 2-D [rows, cols] view with unit column stride, or None."""
    flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return flat if flat.stride(-1) == 1 else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_eager` as one kernel."""
    flat = _rows(x) if _usable(x, weight) else None
    if flat is None:
        return rms_norm_eager(x, weight, eps)
    out = torch.empty(flat.shape, dtype=torch.result_type(x, weight), device=x.device)
    block = triton.next_power_of_2(flat.shape[1])
    _rms_norm_kernel[(flat.shape[0],)](flat, flat, flat, out, weight, flat.stride(0), 0, 0, out.stride(0),
                                       flat.shape[1], eps, HAS_RESIDUAL=False, BLOCK=block, num_warps=_warps(block))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) for h = x + residual, in one kernel: the block's second residual and FFN input."""
    flat_x, flat_r = (_rows(x), _rows(residual)) if _usable(x, residual, weight) else (None, None)
    if flat_x is None or flat_r is None or x.dtype != residual.dtype:
        h = x + residual
        return h, rms_norm_eager(h, weight, eps)
    h = torch.empty(flat_x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(flat_x.shape, dtype=torch.result_type(x, weight), device=x.device)
    block = triton.next_power_of_2(flat_x.shape[1])
    _rms_norm_kernel[(flat_x.shape[0],)](flat_x, flat_r, h, out, weight, flat_x.stride(0), flat_r.stride(0),
                                         h.stride(0), out.stride(0), flat_x.shape[1], eps, HAS_RESIDUAL=True,
                                         BLOCK=block, num_warps=_warps(block))
    return h.view(x.shape), out.view(x.shape)


def rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """`rotary_eager` as one kernel; x [T, heads, d] may be a strided view (of a fused q/k/v product)."""
    tokens, heads, dim = x.shape
    half = dim // 2
    if (not _usable(x) or x.stride(-1) != 1 or dim % 2 or half & (half - 1)
            or rotation.dtype != torch.complex64 or rotation.shape != (tokens, half)):
        return rotary_eager(x, rotation)
    table = torch.view_as_real(rotation.contiguous())  # [T, d/2, 2]: cos, sin
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    per_program = min(triton.next_power_of_2(heads), 8)
    _rotary_kernel[(tokens, triton.cdiv(heads, per_program))](
        x, table, out, x.stride(0), x.stride(1), table.stride(0), out.stride(0), out.stride(1), heads,
        HALF=half, HEADS=per_program)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension (one fused gate/up product)."""
    flat = _rows(gate_up) if _usable(gate_up) else None
    if flat is None or gate_up.shape[-1] % 2:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    cols = flat.shape[1] // 2
    out = torch.empty((flat.shape[0], cols), dtype=gate_up.dtype, device=gate_up.device)
    block = min(triton.next_power_of_2(cols), 2048)
    _silu_mul_kernel[(flat.shape[0], triton.cdiv(cols, block))](flat, out, flat.stride(0), out.stride(0), cols,
                                                                 BLOCK=block)
    return out.view(*gate_up.shape[:-1], cols)
