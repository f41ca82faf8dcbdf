"""Paged decode attention as a Triton kernel (GPU): reads keys and values straight from the blocks.

The portable decode path (`DecodeAttention`) gathers each row's blocks into a contiguous copy
padded to the graph's block-table width, then calls SDPA with a mask. For many long sequences
that moves the KV cache three times per step (read, write the copy, read it again), twice as
much again when contexts are far below the padded width: at 64 sequences of ~1.1K tokens on
NeMo 12B, ~60 GB per decode step against 12 GB of real keys and values. This kernel reads
each row's own blocks once, up to its own context length, in the style of flash-decoding:

- one program per (sequence, key/value head, split of the context); the query heads that share
  a key/value head (grouped-query attention) are handled together, so keys are read once;
- scores by `tl.dot` on a tile padded to 16 query heads (tensor cores want 16 rows), in float32
  tiles (TF32 products, exact for bf16 inputs), with an online softmax in float32;
- with several splits, each writes its normalised partial output and log-sum-exp, and a second
  small kernel merges them. The number of splits is fixed per call shape, so the kernels can be
  captured in a CUDA graph.

`triton` is optional: on machines without it (CPU installs) `available()` is False and the
engine keeps the portable path. Tests run the kernels on the CPU with `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the engine uses the portable SDPA path
    triton = None


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run for tensors on `device`."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


TOKENS_PER_SPLIT = 512  # a context is split only into runs of at least this many tokens
TILE = 64  # tokens per inner iteration


def num_splits(batch: int, kv_heads: int, max_context: int, sm_count: int = 132) -> int:
    """Splits per row for contexts of up to max_context tokens: enough programs to fill the GPU
    (about two per multiprocessor), none covering less than TOKENS_PER_SPLIT of the longest."""
    want = -(-2 * sm_count // (batch * kv_heads))
    return max(1, min(want, -(-max_context // TOKENS_PER_SPLIT)))


if triton is not None:

    @triton.jit
    def _decode_kernel(Q, K, V, Tables, Lens, Out, Part, Lse,
                       stride_qb, stride_qh, stride_kn, stride_kt, stride_kh,
                       stride_tb, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                       scale,
                       GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                       TOK: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        ctx = tl.load(Lens + b).to(tl.int32)
        # Each row divides its own context into equal runs of whole tiles, one per split: how much
        # of the context each program covers does not depend on the padded block-table width.
        per_split = tl.cdiv(tl.cdiv(ctx, tl.num_programs(2)), TOK) * TOK
        lo = s * per_split
        hi = tl.minimum(lo + per_split, ctx)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        heads = kvh * GROUP + g
        q_mask = g < GROUP
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask[:, None],
                    other=0.0).to(tl.float32)

        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        t = tl.arange(0, TOK)
        for start in range(lo, hi, TOK):
            pos = start + t
            valid = pos < hi
            block = tl.load(Tables + b * stride_tb + pos // BLOCK, mask=valid, other=0).to(tl.int64)
            row = block * stride_kn + (pos % BLOCK) * stride_kt + kvh * stride_kh
            k = tl.load(K + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)  # [TOK, D]
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TOK], float32
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            v = tl.load(V + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m = m_new

        if SPLIT:
            # An empty split (its range starts past the context) leaves l_sum 0: weight 0 in the merge.
            safe = tl.where(l_sum > 0, l_sum, 1.0)
            part = Part + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps + d[None, :]
            tl.store(part, acc / safe[:, None], mask=q_mask[:, None])
            lse = tl.where(l_sum > 0, m + tl.log(safe), float("-inf"))
            tl.store(Lse + b * stride_lb + heads * stride_lh + s, lse, mask=q_mask)
        else:
            out = Out + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
            tl.store(out, (acc / l_sum[:, None]).to(Out.dtype.element_ty), mask=q_mask[:, None])

    @triton.jit(do_not_specialize=["splits"])  # one compiled kernel for every split count
    def _merge_kernel(Part, Lse, Out, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                      splits, SPLITS_PAD: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D)
        lse = tl.load(Lse + b * stride_lb + h * stride_lh + s, mask=s < splits, other=float("-inf"))
        top = tl.max(lse, axis=0)
        w = tl.exp(lse - top)  # empty splits have lse -inf: weight 0
        part = tl.load(Part + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                       mask=(s < splits)[:, None], other=0.0)
        out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, splits: int = 1) -> torch.Tensor:
    """One new query per row over its paged keys and values.

    q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D] (one layer); block_tables
    [B, W] block ids (entries past a row's context are never read); context_lens [B] (>= 1,
    at most W * block_size). Returns [B, Hq, D] in q's dtype. `splits` divides each context
    into that many ranges computed in parallel (see `num_splits`); it must not depend on the
    data when the call is captured in a CUDA graph.
    """
    batch, q_heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    if q_heads % kv_heads or dim < 16 or dim & (dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"unsupported shapes: {q_heads} query heads, {kv_heads} kv heads, head_dim {dim}, "
                         f"block size {block_size}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("q and the caches must be contiguous in their last dimension, k and v alike")
    out = torch.empty_like(q)
    common = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK=block_size, D=dim, TOK=TILE,
                  # Products in float32 tiles: TF32 tensor cores hold bf16/fp16 inputs exactly (10 mantissa
                  # bits against 7/10); float32 caches get full float32 products, to match SDPA.
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    scale = 1.0 / math.sqrt(dim)
    if splits == 1:
        _decode_kernel[(batch, kv_heads, 1)](
            q, k_cache, v_cache, block_tables, context_lens, out, out, out,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1), 0, 0, 0, 0, 0,
            scale, SPLIT=False, **common)
        return out
    part = torch.empty(batch, q_heads, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1), scale, SPLIT=True, **common)
    _merge_kernel[(batch, q_heads)](
        part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), D=dim)
    return out


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What `paged_decode_attention` computes, written out row by row in `dtype`."""
    group = q.shape[1] // k_cache.shape[2]
    out = []
    for row, n in enumerate(context_lens.tolist()):
        keys = k_cache[block_tables[row]].flatten(0, 1)[:n].to(dtype).repeat_interleave(group, 1)  # [n, Hq, D]
        values = v_cache[block_tables[row]].flatten(0, 1)[:n].to(dtype).repeat_interleave(group, 1)
        weights = torch.einsum("hd,nhd->hn", q[row].to(dtype), keys).div(q.shape[-1] ** 0.5).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", weights, values))
    return torch.stack(out)


def random_paged_cache(device: torch.device, dtype: torch.dtype, num_blocks: int, block_size: int, kv_heads: int,
                       head_dim: int, rows: int, width: int, gen: torch.Generator):
    """Keys, values [num_blocks, block_size, Hkv, D] and block tables [rows, width] of random data: a
    kernel's self-check input."""
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
                        for _ in range(2))
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(rows)]).to(device)
    return k_cache, v_cache, tables


def first_disagreement(expected: torch.Tensor, runs: dict[str, Callable[[], torch.Tensor]]) -> str | None:
    """Run each variant of a kernel: None if all agree with `expected`, else what went wrong (it
    failed to compile or run on this device, or computed something else)."""
    try:
        for name, run in runs.items():
            error = (run().float() - expected).abs().max().item()
            if not error < 0.05:
                return f"differs from plain attention by {error:.3g} ({name})"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the portable path
        return f"{type(exc).__name__}: {exc}"
    return None


def self_check(device: torch.device, dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int,
               block_size: int) -> str | None:
    """Run the kernel once on small random data against plain attention: None if it agrees, else
    what went wrong."""
    gen = torch.Generator().manual_seed(0)
    width = 8
    k_cache, v_cache, tables = random_paged_cache(device, dtype, 12, block_size, kv_heads, head_dim, 3, width, gen)
    lens = torch.tensor([1, block_size + 3, width * block_size - 5], device=device)
    q = torch.randn(3, q_heads, head_dim, generator=gen).to(device, dtype)
    expected = reference_attention(q, k_cache, v_cache, tables, lens)
    return first_disagreement(expected, {f"splits={splits}": functools.partial(
        paged_decode_attention, q, k_cache, v_cache, tables, lens, splits) for splits in (1, 3)})
