"""Paged attention for a whole engine step as one Triton kernel: decode rows and prompt chunks together.

`PagedAttention` (attention.py) attends a mixed step in several calls on the GPU: the decode
rows in one gathered, masked call, then each prompt chunk in its own call on its own gathered
keys. This kernel does the whole step in one launch, reading keys and values in place from the
paged cache (no gathered copy, no mask tensor), FlashAttention-2 style:

- the queries of the step are one flat batch of sequences back to back (`query_start_loc`); each
  sequence's queries are the last ones of its context, so query i of a chunk of n sees keys
  0 .. context - n + i (bottom-right causal; a decode row is a chunk of one);
- a program per (query block, key/value head). A query block is up to BLOCK_Q consecutive
  queries of one sequence, times the GROUP query heads that share the key/value head
  (grouped-query attention): BLOCK_M = BLOCK_Q * GROUP (padded) rows of one `tl.dot`, so each
  key tile is read once for all of them;
- each program walks its sequence's keys from 0 up to its last query's position in tiles of
  BLOCK_N tokens, looking each token's block up in the block table (so any block size works,
  and a tile may span several blocks), with an online softmax in float32;
- the programs are numbered flat over the query blocks of all sequences: sequence b owns ids
  [start_b // BLOCK_Q + b, start_{b+1} // BLOCK_Q + b + 1) (`start` = query_start_loc), which
  is always enough for its ceil(len_b / BLOCK_Q) blocks; a program finds its sequence by binary
  search and ids past the sequence's last block return at once. The grid therefore depends only
  on the number of queries and sequences, never on their lengths: no host sync, and the launch
  can be captured in a CUDA graph.

Numerics: scores from `tl.dot` with float32 accumulation. bf16/fp16 inputs go to the tensor
cores as they are (their products are exact in float32); the softmax weights are rounded to the
value dtype for the second product, as FlashAttention does. float32 inputs use full float32
products ("ieee"), to match SDPA closely. (Under Triton's CPU interpreter, whose `tl.dot` gets
bfloat16 wrong, bfloat16 tiles are widened to float32 first: the same numbers; see the wrapper.)

`triton` is optional: without it (CPU installs) `available()` is False and the engine keeps its
SDPA paths. Tests run the kernel on the CPU with `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import functools
import math

import torch

from pixtral.engine.triton_decode import first_disagreement, random_paged_cache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the engine uses the portable SDPA paths
    triton = None

BLOCK_N = 64  # keys per inner iteration
LOG2E = 1.4426950408889634  # the kernel uses exp2: exp(x) = exp2(x * log2(e)), folded into the scale


def block_rows(max_query_len: int, group: int) -> int:
    """Rows of a query tile (BLOCK_M): query heads of one group times up to BLOCK_Q queries.

    The rows the longest sequence brings (max_query_len * group), rounded up to a power of two and
    held between 16 (decode steps: tensor cores want 16 rows, and more would be padding) and 64
    (prompt chunks: each key tile is reused for many queries). Never less than one group, so every
    program holds at least one whole query. Tuned on no GPU yet (see the benchmark)."""
    def pow2(x: int) -> int:
        return 1 << (x - 1).bit_length()

    return max(16, min(64, pow2(max(1, max_query_len) * group)), pow2(group))


if triton is not None:

    @triton.jit
    def _find_sequence(QueryStart, q_block, num_seqs, BLOCK_Q: tl.constexpr):
        """The last sequence b whose first program id, start_b // BLOCK_Q + b, is <= q_block.
        Those ids strictly increase with b (even past empty sequences), so the search is exact."""
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(QueryStart + mid) // BLOCK_Q + mid <= q_block:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit(do_not_specialize=["num_seqs"])  # one compiled kernel for every batch size
    def _varlen_kernel(Q, K, V, Out, Tables, QueryStart, Lens, num_seqs,
                       stride_qt, stride_qh, stride_kn, stride_kt, stride_kh, stride_vn, stride_vt, stride_vh,
                       stride_ot, stride_oh, stride_tb, qk_scale,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        q_block = tl.program_id(0)
        kvh = tl.program_id(1)
        b = _find_sequence(QueryStart, q_block, num_seqs, BLOCK_Q)
        q_start = tl.load(QueryStart + b).to(tl.int32)
        q_len = tl.load(QueryStart + b + 1).to(tl.int32) - q_start
        first = (q_block - (q_start // BLOCK_Q + b)) * BLOCK_Q  # this block's first query, within the chunk
        if first >= q_len:  # a spare id of sequence b (see the module docstring), or an empty sequence
            return
        ctx = tl.load(Lens + b).to(tl.int32)
        chunk_pos = ctx - q_len  # position of the chunk's first query in its sequence

        # Row r of the tile: query `first + r // GROUP` of the chunk, query head `kvh * GROUP + r % GROUP`.
        r = tl.arange(0, BLOCK_M)
        tok = first + r // GROUP
        head = kvh * GROUP + r % GROUP
        row_ok = (r // GROUP < BLOCK_Q) & (tok < q_len)  # BLOCK_M may exceed BLOCK_Q * GROUP; the chunk may end
        q_pos = chunk_pos + tok  # each row sees keys 0 .. q_pos (for valid rows q_pos < ctx)
        d = tl.arange(0, D)
        q_rows = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
        q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # Keys past this block's last query are visible to none of its rows; those before it are
        # all written (< ctx). Nothing at or past `hi` is loaded, so unwritten slots and block-table
        # entries past the context are never read.
        hi = chunk_pos + tl.minimum(first + BLOCK_Q, q_len)
        n = tl.arange(0, BLOCK_N)
        table = Tables + b.to(tl.int64) * stride_tb
        for start in range(0, hi, BLOCK_N):
            pos = start + n
            in_range = pos < hi
            block = tl.load(table + pos // BLOCK, mask=in_range, other=0).to(tl.int64)
            slot = pos % BLOCK
            k = tl.load(K + (block * stride_kn + slot * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                        mask=in_range[:, None], other=0.0)  # [BLOCK_N, D]
            if UPCAST:
                k = k.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
            # Causal: also hides the zero-filled keys past `hi` from valid rows (their q_pos < hi).
            # Every valid row sees key 0 in the first tile, so m is finite from then on.
            scores = tl.where(pos[None, :] <= q_pos[:, None], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            v = tl.load(V + (block * stride_vn + slot * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
                        mask=in_range[:, None], other=0.0)
            weights = p.to(V.dtype.element_ty)  # rounded to the value dtype, as FlashAttention does
            if UPCAST:
                weights = weights.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(weights, v, input_precision=PRECISION)
            m = m_new

        out_rows = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(Out + out_rows[:, None] + d[None, :], (acc / l_sum[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None])


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           query_start_loc: torch.Tensor, context_lens: torch.Tensor, *,
                           max_query_len: int | None = None, scale: float | None = None,
                           out: torch.Tensor | None = None, block_m: int | None = None) -> torch.Tensor:
    """Causal attention of many sequences' new queries over their paged keys and values, one launch.

    q [T, Hq, D]: the queries of B sequences back to back, sequence b's at rows
        query_start_loc[b] .. query_start_loc[b + 1] - 1 (len_b of them; 0 is allowed).
    k_cache, v_cache [num_blocks, block_size, Hkv, D]: one layer's cache, last dim contiguous;
        Hq a multiple of Hkv (query head h reads kv head h // (Hq / Hkv)). The step's new keys
        and values must already be written.
    block_tables [B, W]: sequence b's token p lives in block block_tables[b, p // block_size],
        slot p % block_size; entries past its context are never read (any padding value).
    query_start_loc [B + 1]: prefix sums of the query lengths, from 0 to T.
    context_lens [B]: tokens of sequence b in the cache after this step, its queries included:
        its queries sit at positions context_lens[b] - len_b .. context_lens[b] - 1, and query
        at position p attends to keys 0 .. p. A decode row is len_b = 1.
    Integer tensors may be int32 or int64. q and the caches share one dtype: float32, bfloat16
    or float16; D a power of two >= 16; any block size.

    max_query_len: the longest len_b, only to choose the tile height (`block_rows`); default
        T - B + 1, an upper bound that needs no device sync. scale: default 1 / sqrt(D).
    out: optional [T, Hq, D] tensor to write into. block_m: override the tile height (tests,
        tuning). Returns out (or a new tensor), in q's dtype. Launch shapes depend only on T, B
        and these arguments, so a call can be captured in a CUDA graph.
    """
    if triton is None:
        raise RuntimeError("paged_varlen_attention needs triton")
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"expected q [T, Hq, D] and caches [num_blocks, block_size, Hkv, D], got q "
                         f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    tokens, q_heads, dim = q.shape
    _, block_size, kv_heads, cache_dim = k_cache.shape
    if q_heads % kv_heads or dim != cache_dim or dim < 16 or dim & (dim - 1):
        raise ValueError(f"unsupported shapes: {q_heads} query heads, {kv_heads} kv heads, head_dim {dim} "
                         f"(cache head_dim {cache_dim}); need a multiple of the kv heads and a power of two >= 16")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (torch.float32, torch.bfloat16,
                                                                          torch.float16):
        raise ValueError(f"q and the caches must share one dtype of float32, bfloat16, float16; got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    batch = context_lens.shape[0]
    if query_start_loc.shape != (batch + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"expected query_start_loc [B + 1], block_tables [B, W], context_lens [B]; got "
                         f"{tuple(query_start_loc.shape)}, {tuple(block_tables.shape)}, {tuple(context_lens.shape)}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q, the caches and block_tables must be contiguous in their last dimension")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be like q {tuple(q.shape)} {q.dtype}, contiguous in its last dimension")
    if tokens == 0 or batch == 0:
        return out

    group = q_heads // kv_heads
    if block_m is None:
        block_m = block_rows(max_query_len if max_query_len is not None else tokens - batch + 1, group)
    if block_m < 16 or block_m & (block_m - 1) or block_m < group:
        raise ValueError(f"block_m {block_m}: need a power of two >= 16 and >= the {group} query heads per kv head")
    block_q = block_m // group
    # Enough ids for every sequence's query blocks (see the module docstring); the extras return at once.
    grid = (tokens // block_q + batch, kv_heads)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    # Triton's CPU interpreter multiplies bfloat16 tiles as their raw 16-bit integers (numpy has no
    # bfloat16), so there the tiles are widened to float32 first (exactly), the softmax weights
    # still rounded to bfloat16: the same numbers as the GPU's bf16 products with float32 sums.
    upcast = q.device.type != "cuda" and q.dtype == torch.bfloat16
    _varlen_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, context_lens, batch,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0), scale * LOG2E,
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=BLOCK_N, BLOCK=block_size, D=dim,
        # Only float32 inputs see this: full float32 products (16-bit inputs are exact in any mode).
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)
    return out


def reference_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, query_start_loc: torch.Tensor, context_lens: torch.Tensor,
                               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """What `paged_varlen_attention` computes, one sequence at a time in `dtype`: gather its keys
    and values from the cache, then SDPA with a bottom-right causal mask. Returns [T, Hq, D] in `dtype`."""
    group = q.shape[1] // k_cache.shape[2]
    block_size = k_cache.shape[1]
    starts = query_start_loc.tolist()
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    for b, ctx in enumerate(context_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        used = block_tables[b, : -(-ctx // block_size)].long()
        keys, values = (c[used].flatten(0, 1)[:ctx].to(dtype).repeat_interleave(group, 1).transpose(0, 1)
                        for c in (k_cache, v_cache))  # [Hq, ctx, D]
        visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - (hi - lo), ctx)[:, None]
        attended = torch.nn.functional.scaled_dot_product_attention(
            q[lo:hi].to(dtype).transpose(0, 1), keys, values, attn_mask=visible.to(q.device))
        out[lo:hi] = attended.transpose(0, 1)
    return out


def self_check(device: torch.device, dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int,
               block_size: int) -> str | None:
    """Run the kernel once on a small mixed step against `reference_varlen_attention`: None if it
    agrees, else what went wrong (it failed to compile or run on this device, or computed something else)."""
    gen = torch.Generator().manual_seed(0)
    width = 8
    k_cache, v_cache, tables = random_paged_cache(device, dtype, 16, block_size, kv_heads, head_dim, 3, width, gen)
    lens = [1, 5, 3 * block_size + 2]  # a decode row, a chunk ending mid-block after a prefix, one of several blocks
    contexts = torch.tensor([block_size + 3, 2 * block_size, width * block_size - 5], device=device)
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device, dtype=torch.int32)
    q = torch.randn(sum(lens), q_heads, head_dim, generator=gen).to(device, dtype)
    expected = reference_varlen_attention(q, k_cache, v_cache, tables, starts, contexts, torch.float32)
    group = q_heads // kv_heads
    tiles = sorted({block_rows(1, group), block_rows(2**20, group)})  # decode and prompt tiles
    return first_disagreement(expected, {f"block_m={m}": functools.partial(
        paged_varlen_attention, q, k_cache, v_cache, tables, starts, contexts, block_m=m) for m in tiles})
