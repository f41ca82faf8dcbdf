"""Skip the vision encoder's frozen residual branches that add exactly zero.

`init_local_encoder` and `init_centering_encoder` start five of the six branches of the default
model's encoder with an all-zero output projection, and a frozen encoder keeps them so: each adds
exactly 0 to the residual stream, and computing it is wasted work (5% of a training step,
research/benchmarks/bench_frozen_encoder_step.py). The trainer swaps such blocks for subclasses
whose forward leaves the branch out; the parameters stay where they are, so state dicts, saving
and loading are unchanged. Exact: x + 0 is x.
"""

from __future__ import annotations

from torch import nn

from pixtral.model.vision_encoder import VisionBlock


class WithoutAttention(VisionBlock):
    def forward(self, x, rotation, seqlens):
        return x + self.feed_forward(self.ffn_norm(x))


class WithoutFeedForward(VisionBlock):
    def forward(self, x, rotation, seqlens):
        return x + self.attention(self.attention_norm(x), rotation, seqlens)


class WithoutBranches(VisionBlock):
    def forward(self, x, rotation, seqlens):
        return x


KINDS = {(False, False): VisionBlock, (True, False): WithoutAttention, (False, True): WithoutFeedForward,
         (True, True): WithoutBranches}


def adds_zero(branch: nn.Module, out_proj: str) -> bool:
    """Frozen, and its output projection a plain bias-free linear whose weight is all zeros
    (a branch with LoRA, or with any parameter training, is computed)."""
    proj = getattr(branch, out_proj)
    frozen = not any(p.requires_grad for p in branch.parameters())
    return frozen and type(proj) is nn.Linear and proj.bias is None and not proj.weight.any()


def skip_zero_branches(model: nn.Module) -> int:
    """Swap each vision block for the kind that leaves out its zero branches; returns how many
    branches are left out (0 for a model without a vision encoder)."""
    encoder = getattr(model, "vision_encoder", None)
    if encoder is None:
        return 0
    count = 0
    for block in encoder.transformer.layers:
        kind = (adds_zero(block.attention, "wo"), adds_zero(block.feed_forward, "w2"))
        block.__class__ = KINDS[kind]
        count += sum(kind)
    return count
