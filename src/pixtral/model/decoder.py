"""The Mistral decoder block: GQA attention with RoPE-1D and a SiLU-gated FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pixtral.model import fused_ops
from pixtral.model.args import ModelArgs
from pixtral.model.attention import AttentionContext
from pixtral.model.layers import FeedForward, RMSNorm, add_and_feed_forward, fuse_linear_weights, linear_views_of
from pixtral.model.rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # head_dim is its own field: for NeMo 12B it is 128, not dim / n_heads = 160.
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.wqkv: torch.Tensor | None = None  # set by `fuse_projections` (inference)
        self.fused = False  # inference on the GPU: RoPE as one Triton kernel per tensor

    def fuse_projections(self) -> None:
        """Inference: wq, wk and wv become views into one weight, read by a single matmul.

        A decode step reads every weight once per token, and one [6144, 5120] matrix-vector
        product runs nearer the memory bandwidth than three smaller ones. The parameters keep
        their names, values and requires_grad (views into the fused storage), so state dicts are
        unchanged and in-place loads reach the fused weight. The fused weight is used only while
        the parameters still are those views (see `linear_views_of`): moving or casting the
        model, replacing a parameter or wrapping a projection (LoRA) quietly returns it to three
        matmuls, as does recording gradients.
        """
        linears = (self.wq, self.wk, self.wv)
        if not all(type(m) is nn.Linear for m in linears):
            return  # wrapped (LoRA): the wrappers' own forward must run
        self.wqkv = fuse_linear_weights(linears)

    def _qkv_sizes(self) -> list[int]:
        return [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]

    def forward(self, x: torch.Tensor, rotation, ctx: AttentionContext, layer: int) -> torch.Tensor:
        if self.wqkv is not None and not linear_views_of(self.wqkv, (self.wq, self.wk, self.wv)):
            self.wqkv = None  # the parameters moved on (device, dtype, replaced, wrapped): unfused from now on
        if self.wqkv is not None and not (torch.is_grad_enabled() and self.wq.weight.requires_grad):
            q, k, v = F.linear(x, self.wqkv).split(self._qkv_sizes(), dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))
        k = k.unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.n_kv_heads, self.head_dim))
        rotate = fused_ops.rotary if self.fused else apply_rotary
        q, k = rotate(q, rotation), rotate(k, rotation)
        return self.wo(ctx.attend(layer, q, k, v).flatten(1))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rotation, ctx: AttentionContext, layer: int):
        return add_and_feed_forward(x, self.attention(self.attention_norm(x), rotation, ctx, layer), self.ffn_norm, self.feed_forward)
