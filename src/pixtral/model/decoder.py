"""The Mistral decoder block: GQA attention with RoPE-1D and a SiLU-gated FFN."""

from __future__ import annotations

import torch
from torch import nn

from pixtral.model.args import ModelArgs
from pixtral.model.attention import AttentionContext
from pixtral.model.layers import FeedForward, RMSNorm
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

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, dim] -> q [T, n_heads * head_dim], k and v [T, n_kv_heads * head_dim]."""
        return self.wq(x), self.wk(x), self.wv(x)

    rotary = staticmethod(apply_rotary)

    def forward(self, x: torch.Tensor, rotation, ctx: AttentionContext, layer: int) -> torch.Tensor:
        q, k, v = self.project(x)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))
        k = k.unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.n_kv_heads, self.head_dim))
        q, k = self.rotary(q, rotation), self.rotary(k, rotation)
        return self.wo(ctx.attend(layer, q, k, v).flatten(1))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rotation, ctx: AttentionContext, layer: int):
        h = x + self.attention(self.attention_norm(x), rotation, ctx, layer)
        return h + self.feed_forward(self.ffn_norm(h))
