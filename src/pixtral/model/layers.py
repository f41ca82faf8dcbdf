"""Building blocks shared by the vision encoder and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pixtral.model import fused_ops


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the activation dtype, then scale (reference order)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False  # inference on the GPU: one Triton kernel (`Pixtral.use_fused_kernels`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return fused_ops.rms_norm_eager(x, self.weight, self.eps)


def fuse_linear_weights(linears: tuple[nn.Linear, ...]) -> torch.Tensor:
    """Concatenate the weights of bias-free linears along their outputs and make each weight a
    view into the result (same values, same requires_grad); returns the fused weight."""
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start: start + rows], requires_grad=m.weight.requires_grad)
        start += rows
    return fused


def linear_views_of(fused: torch.Tensor, linears: tuple[nn.Module, ...]) -> bool:
    """Whether these plain linears' weights are still consecutive row blocks of `fused`."""
    row_bytes = fused.stride(0) * fused.element_size()
    offset = fused.data_ptr()
    for m in linears:
        if type(m) is not nn.Linear or m.weight.data_ptr() != offset or m.weight.dtype != fused.dtype:
            return False
        offset += m.weight.shape[0] * row_bytes
    return True


class FeedForward(nn.Module):
    """SiLU-gated FFN: w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up projection."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: torch.Tensor | None = None  # set by `fuse_projections` (inference)
        self.fused = False  # inference on the GPU: the SiLU gate as one Triton kernel

    def fuse_projections(self) -> None:
        """Inference: w1 and w3 become views into one weight, read by a single matmul (see
        `Attention.fuse_projections`); names, values and requires_grad are unchanged."""
        if not (type(self.w1) is nn.Linear and type(self.w3) is nn.Linear):
            return  # wrapped (LoRA): the wrappers' own forward must run
        self.w13 = fuse_linear_weights((self.w1, self.w3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None and not linear_views_of(self.w13, (self.w1, self.w3)):
            self.w13 = None  # the parameters moved on (device, dtype, replaced, wrapped): unfused from now on
        if self.w13 is not None and not (torch.is_grad_enabled() and self.w1.weight.requires_grad):
            gate_up = F.linear(x, self.w13)
            if self.fused:
                return self.w2(fused_ops.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def add_and_feed_forward(x: torch.Tensor, attn_out: torch.Tensor, ffn_norm: RMSNorm,
                         feed_forward: FeedForward) -> torch.Tensor:
    """The second half of a pre-norm block: h = x + attn_out, then h + feed_forward(ffn_norm(h)).
    With fused kernels the add and the norm are one kernel."""
    if ffn_norm.fused:
        h, normed = fused_ops.add_rms_norm(x, attn_out, ffn_norm.weight, ffn_norm.eps)
        return h + feed_forward(normed)
    h = x + attn_out
    return h + feed_forward(ffn_norm(h))
