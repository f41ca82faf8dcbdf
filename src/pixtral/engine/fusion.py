"""Inference versions of the model's modules, swapped in once, at load time, by the engine.

The model's modules (`pixtral.model`) have one forward each, for reading and for training. For
serving on a GPU two changes pay, and this is the one place that makes them:

- **fused projections**: q/k/v read by one matmul, the FFN's gate/up by another. A decode step
  reads every weight once per token, and one [6144, 5120] matrix-vector product runs nearer the
  memory bandwidth than three smaller ones. The weights are concatenated once; the separate ones
  are freed.
- **fused kernels** (`fused_ops`, Triton): RMSNorm with the residual add before it, RoPE and the
  SiLU gate, each one kernel with the eager code's rounding points.

`fuse(model)` replaces modules in place by subclasses that override only what differs, so their
outputs equal the originals' up to float32 summation order (tests/engine/test_fusion.py). A
projection that is not a plain `nn.Linear` (a LoRA wrapper, say) is left as it is. Fused modules
have other parameter names (`wqkv`, `w13`): the engine never saves the model, and a model to
save or train is one that was never fused.
"""

from __future__ import annotations

import torch
from torch import nn

from pixtral.engine import fused_ops
from pixtral.model.decoder import Attention, TransformerBlock
from pixtral.model.layers import FeedForward, RMSNorm
from pixtral.model.vision_encoder import VisionAttention, VisionBlock


def concatenated(linears: tuple[nn.Linear, ...]) -> nn.Linear:
    """One bias-free linear whose outputs are those of `linears`, one after the other."""
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=False,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
    return fused.requires_grad_(False)


def plain(*modules: nn.Module) -> bool:
    return all(type(m) is nn.Linear and m.bias is None for m in modules)


class FusedQKVAttention(Attention):
    """q, k and v from one matmul (`wqkv` = [wq; wk; wv])."""

    def project(self, x):
        kv = self.n_kv_heads * self.head_dim
        return self.wqkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)


class TritonRotaryAttention(Attention):
    rotary = staticmethod(fused_ops.rotary)


class TritonFusedQKVAttention(FusedQKVAttention):
    rotary = staticmethod(fused_ops.rotary)


class TritonVisionAttention(VisionAttention):
    rotary = staticmethod(fused_ops.rotary)


class FusedGateUpFeedForward(FeedForward):
    """The gate and up projections from one matmul (`w13` = [w1; w3])."""

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(nn.functional.silu(gate) * up)


class TritonFeedForward(FusedGateUpFeedForward):
    def forward(self, x):
        return self.w2(fused_ops.silu_mul(self.w13(x)))


class TritonRMSNorm(RMSNorm):
    def forward(self, x):
        return fused_ops.rms_norm(x, self.weight, self.eps)


class TritonTransformerBlock(TransformerBlock):
    """The residual add and the FFN's norm in one kernel."""

    def forward(self, x, rotation, ctx, layer):
        attn = self.attention(self.attention_norm(x), rotation, ctx, layer)
        h, normed = fused_ops.add_rms_norm(x, attn, self.ffn_norm.weight, self.ffn_norm.eps)
        return h + self.feed_forward(normed)


class TritonVisionBlock(VisionBlock):
    def forward(self, x, rotation, seqlens):
        attn = self.attention(self.attention_norm(x), rotation, seqlens)
        h, normed = fused_ops.add_rms_norm(x, attn, self.ffn_norm.weight, self.ffn_norm.eps)
        return h + self.feed_forward(normed)


def fuse(model: nn.Module, projections: bool = True, kernels: bool = True) -> nn.Module:
    """Swap the model's modules for their inference versions (in place); returns the model."""
    kernels = kernels and fused_ops.triton is not None
    for module in list(model.modules()):
        if type(module) is Attention:
            _fuse_attention(module, projections, kernels)
        elif type(module) is VisionAttention and kernels:
            module.__class__ = TritonVisionAttention
        elif type(module) is FeedForward and projections and plain(module.w1, module.w3):
            module.w13 = concatenated((module.w1, module.w3))
            del module.w1, module.w3
            module.__class__ = TritonFeedForward if kernels else FusedGateUpFeedForward
        elif type(module) is RMSNorm and kernels:
            module.__class__ = TritonRMSNorm
        elif type(module) is TransformerBlock and kernels:
            module.__class__ = TritonTransformerBlock
        elif type(module) is VisionBlock and kernels:
            module.__class__ = TritonVisionBlock
    return model


def _fuse_attention(module: Attention, projections: bool, kernels: bool) -> None:
    if projections and plain(module.wq, module.wk, module.wv):
        module.wqkv = concatenated((module.wq, module.wk, module.wv))
        del module.wq, module.wk, module.wv
        module.__class__ = TritonFusedQKVAttention if kernels else FusedQKVAttention
    elif kernels:
        module.__class__ = TritonRotaryAttention
