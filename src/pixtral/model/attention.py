"""How the decoder's attention sees the sequence: the model asks an `AttentionContext`.

The decoder computes q/k/v for a flat run of tokens [T, heads, head_dim] and hands them to
the context, which knows the positions, which tokens may attend to which, and where keys and
values live (nowhere, a contiguous cache, or the engine's paged blocks). This keeps the model
ignorant of caching and scheduling, as in vLLM.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


class AttentionContext(Protocol):
    positions: torch.Tensor  # [T] absolute position of each token, for RoPE

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (already rotated) -> [T, Hq, D]."""
        ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """Attention over [T, H, D] tensors of one sequence, grouped-query aware.

    causal: the Lq queries are the last Lq of the Lk key positions, so query i sees keys up to
    Lk - Lq + i (bottom-right aligned: plain causal when Lq == Lk, as for a chunk of a prompt
    appended after its cached prefix).
    """
    lq, lk = q.shape[0], k.shape[0]
    gqa = q.shape[1] != k.shape[1]
    # A batch of one, because PyTorch's fused CPU kernel only takes 4-D inputs: 3-D ones fall
    # back to the unfused math path, several times slower and memory-hungry.
    qb, kb, vb = (t.transpose(0, 1)[None] for t in (q, k, v))
    if not causal or lq == 1:  # a single (newest) query sees every key
        out = F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=gqa)
    elif lq == lk:
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=gqa)
    elif q.is_cuda:
        out = lower_right_causal_sdpa(qb, kb, vb)
    else:
        mask = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lk - lq, lk, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def lower_right_causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bottom-right causal attention over [B, H, L, D] without a materialised mask (the GPU path).

    On CUDA a boolean mask rules out the flash kernel, and the memory-efficient one has no
    grouped-query support, so a masked GQA call lands on the math kernel, which builds the whole
    [H, Lq, Lk] score tensor in float32 (16 GiB for an 8192-token chunk after an 8192-token
    prefix on NeMo 12B). PyTorch's `causal_lower_right` bias runs the flash or memory-efficient
    kernel with the diagonal moved instead; key/value heads are repeated for it first (the same
    grouping as `enable_gqa`: query head h reads key head h // (Hq / Hkv)).
    """
    if q.shape[1] != k.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))


class PackedCausal:
    """No cache: one or more independent sequences packed back to back, each causal.

    Used for a plain forward pass and for training on packed samples: tokens of one sample
    never see another sample, and positions restart at 0 for each.
    """

    def __init__(self, seqlens: list[int], device: torch.device | str = "cpu"):
        if not seqlens or min(seqlens) <= 0:
            raise ValueError(f"sequence lengths must be positive, got {seqlens}")
        self.seqlens = list(seqlens)
        self.positions = torch.cat([torch.arange(n, device=device) for n in seqlens])

    def attend(self, layer: int, q, k, v):
        if len(self.seqlens) == 1:
            return sdpa(q, k, v, causal=True)
        outs = [
            sdpa(qs, ks, vs, causal=True)
            for qs, ks, vs in zip(q.split(self.seqlens), k.split(self.seqlens), v.split(self.seqlens))
        ]
        return torch.cat(outs)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Non-causal attention confined to consecutive blocks (one block per image).

    No mask over the whole packed sequence is ever built: runs of equal-length blocks are
    stacked into one batched call, so many same-size images cost one kernel launch.
    """
    outs, start, i = [], 0, 0
    while i < len(seqlens):
        n, j = seqlens[i], i
        while j < len(seqlens) and seqlens[j] == n:
            j += 1
        count, end = j - i, start + n * (j - i)
        qb, kb, vb = (t[start:end].unflatten(0, (count, n)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb)  # [count, H, n, D]
        outs.append(out.transpose(1, 2).flatten(0, 1))
        start, i = end, j
    return torch.cat(outs) if len(outs) > 1 else outs[0]
