"""The Mistral decoder block: GQA attention with RoPE-1D and a SiLU-gated FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pixtral.model.args import ModelArgs
from pixtral.model.attention import AttentionContext
from pixtral.model.layers import FeedForward, RMSNorm
from pixtral.model import fused_ops
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
        their names and values (views into the fused storage), so state dicts are unchanged.
        Call it after the model is on its device: moving it afterwards would split the views.
        """
        if not all(type(m) is nn.Linear for m in (self.wq, self.wk, self.wv)):
            return  # wrapped (LoRA): the wrappers' own forward must run
        fused = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]).detach()
        for linear, part in zip((self.wq, self.wk, self.wv), fused.split(self._qkv_sizes())):
            linear.weight = nn.Parameter(part, requires_grad=False)
        self.wqkv = fused

    def _qkv_sizes(self) -> list[int]:
        return [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]

    def forward(self, x: torch.Tensor, rotation, ctx: AttentionContext, layer: int) -> torch.Tensor:
        if self.wqkv is not None:
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
        a = self.attention(self.attention_norm(x), rotation, ctx, layer)
        if self.ffn_norm.fused:  # the residual add and the FFN's norm in one kernel
            h, normed = fused_ops.add_rms_norm(x, a, self.ffn_norm.weight, self.ffn_norm.eps)
            return h + self.feed_forward(normed)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h))
