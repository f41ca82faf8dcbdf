"""The Triton kernel for a whole mixed step (decode rows and prompt chunks), run on the CPU by
Triton's interpreter.

Tests that launch the kernel re-run themselves in a fresh pytest process with `TRITON_INTERPRET=1`
(the outer test passes when the inner one does).
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.triton_interpret import INTERPRETED
from tests.triton_interpret import rerun_interpreted as _rerun

pytest.importorskip("triton")
rerun_interpreted = functools.partial(_rerun, __file__)

# (cached tokens before this step, queries this step) per sequence: every kind of row in one step.
MIXED = [
    (0, 1),  # a prompt's first token: context 1
    (0, 37),  # a whole prompt, no prefix: several blocks, ends mid-block
    (130, 1),  # a decode row
    (15, 1),  # a decode row whose key is the last slot of a block
    (16, 0),  # a sequence with no queries this step
    (21, 19),  # a prefix hit: starts mid-block, spans blocks
    (32, 16),  # a chunk that starts and ends on block boundaries (for blocks of 4 and 16)
    (7, 1),  # a single-token chunk
    (70, 90),  # a long chunk after a prefix: many query blocks, several key tiles
    (999, 1),  # a decode row of a long context: 16 key tiles
]


def mixed_step(specs, block_size, kv_heads, q_heads, dim, dtype, seed=0, share=(6, 5)):
    """Queries, a NaN-filled cache whose slots below each context hold random keys and values,
    block tables padded with ids far outside the cache, query_start_loc and context_lens.
    Sequence share[0] starts with the blocks of sequence share[1] (a shared prefix)."""
    gen = torch.Generator().manual_seed(seed)
    contexts = [start + n for start, n in specs]
    need = [-(-c // block_size) for c in contexts]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for blocks in need:
        tables.append(order[used: used + blocks])
        used += blocks
    if share:
        i, j = share
        shared = min(specs[i][0], specs[j][0] + specs[j][1]) // block_size  # whole blocks both sequences hold
        tables[i][:shared] = tables[j][:shared]
    width = max(need) + 2
    table = torch.full((len(specs), width), 10**6, dtype=torch.int32)  # never read
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for b, (blocks, ctx) in enumerate(zip(tables, contexts)):
        table[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        pos = torch.arange(ctx)
        written[torch.tensor(blocks, dtype=torch.long)[pos // block_size], pos % block_size] = True
    caches = []
    for _ in range(2):
        cache = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"))
        cache[written] = torch.randn(int(written.sum()), kv_heads, dim, generator=gen)
        caches.append(cache.to(dtype))
    lens = torch.tensor([n for _, n in specs])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
    q = torch.randn(int(lens.sum()), q_heads, dim, generator=gen).to(dtype)
    return q, caches[0], caches[1], table, starts, torch.tensor(contexts, dtype=torch.int32)


# (dtype, query heads per kv head, kv heads, head_dim): GQA ratios 1, 2, 4, 12 (Pixtral-Large's 96/8).
CASES = [
    (torch.float32, 1, 2, 16),
    (torch.float32, 2, 2, 64),
    (torch.float32, 4, 2, 32),
    (torch.float32, 12, 1, 128),
    (torch.bfloat16, 4, 2, 128),
    (torch.bfloat16, 12, 1, 32),
    (torch.float16, 2, 2, 64),
]
# Against a float64 reference on the same (exactly representable) inputs. float32: summation
# order and exp2 only. 16-bit: the kernel rounds its softmax weights and its output to the
# input dtype (relative 2**-9 for bfloat16, 2**-11 for float16, on outputs of magnitude up to ~3).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype,group,kv_heads,dim", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_mixed_step_matches_attention_over_each_sequences_own_tokens(dtype, group, kv_heads, dim, request):
    """Every kind of row in one launch, for blocks of 16 and 4 and each tile height, against SDPA
    per sequence; the NaN in every unwritten slot (and the out-of-range table padding) never leaks."""
    if not INTERPRETED:
        return rerun_interpreted(request.node.name)
    from pixtral.engine.triton_prefill import paged_varlen_attention, reference_varlen_attention

    tol = TOLERANCE[dtype]
    for block_size in (16, 4):
        q, k_cache, v_cache, tables, starts, contexts = mixed_step(MIXED, block_size, kv_heads, kv_heads * group,
                                                                   dim, dtype)
        ref = reference_varlen_attention(q, k_cache, v_cache, tables, starts, contexts)
        # The default tile height here is 64 (the longest chunk is 90 queries); 64 rows of 12 heads: 5 queries a tile.
        for block_m in (None, 16):
            out = paged_varlen_attention(q, k_cache, v_cache, tables, starts, contexts, block_m=block_m)
            assert out.dtype == dtype and out.shape == q.shape
            assert out.isfinite().all()
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol,
                                       msg=lambda m: f"block_size={block_size} block_m={block_m}: {m}")


def test_a_sequences_output_does_not_depend_on_the_rest_of_the_batch():
    """The same bits for a sequence alone, in the batch, in the batch reversed, and next to
    sequences whose queries are NaN: a program reads only its own sequence's rows and keys."""
    if not INTERPRETED:
        return rerun_interpreted("test_a_sequences_output_does_not_depend_on_the_rest_of_the_batch")
    from pixtral.engine.triton_prefill import paged_varlen_attention

    q, k_cache, v_cache, tables, starts, contexts = mixed_step(MIXED, 4, 2, 8, 32, torch.float32)
    run = functools.partial(paged_varlen_attention, k_cache=k_cache, v_cache=v_cache, block_m=16)
    batch = run(q, block_tables=tables, query_start_loc=starts, context_lens=contexts)
    rows = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

    for b, r in enumerate(rows):  # alone
        alone = run(q[r], block_tables=tables[b: b + 1], query_start_loc=starts[b: b + 2] - starts[b],
                    context_lens=contexts[b: b + 1])
        assert torch.equal(alone, batch[r]), b

    flip = list(reversed(range(len(rows))))  # reversed: every sequence at another offset
    lens = torch.tensor([r.stop - r.start for r in rows])[flip]
    flipped = run(torch.cat([q[rows[b]] for b in flip]), block_tables=tables[flip],
                  query_start_loc=torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32),
                  context_lens=contexts[flip])
    assert torch.equal(flipped, torch.cat([batch[rows[b]] for b in flip]))

    poisoned = q.clone()
    poisoned[rows[8]] = float("nan")  # the long chunk's queries
    out = run(poisoned, block_tables=tables, query_start_loc=starts, context_lens=contexts)
    others = torch.ones(len(q), dtype=torch.bool)
    others[rows[8]] = False
    assert torch.equal(out[others], batch[others])


def test_kernel_agrees_with_the_engines_cpu_attention():
    """Same cache layout and conventions as `PagedAttention`: its per-sequence reference over a
    `PagedKVCache` layer, after it wrote the step's keys and values, is what the kernel computes."""
    if not INTERPRETED:
        return rerun_interpreted("test_kernel_agrees_with_the_engines_cpu_attention")
    from pixtral.engine.attention import PagedAttention, padded_block_table
    from pixtral.engine.chunk import Chunk
    from pixtral.engine.kv_cache import PagedKVCache
    from pixtral.engine.triton_prefill import paged_varlen_attention, self_check
    from pixtral.model.args import ModelArgs

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=1, n_heads=8, n_kv_heads=2, vocab_size=1)
    cache = PagedKVCache(args, 40, 4, torch.device("cpu"), torch.float32)
    cache.k.normal_()  # the prefixes: written by earlier steps
    cache.v.normal_()
    blocks = torch.randperm(40).tolist()
    chunks = [Chunk(9, 1, blocks[0:3]), Chunk(0, 13, blocks[3:7]), Chunk(6, 10, blocks[7:11]),
              Chunk(30, 1, blocks[11:19])]
    attention = PagedAttention(cache, chunks, torch.device("cpu"))
    tokens = sum(c.length for c in chunks)
    q = torch.randn(tokens, 8, 16)
    k, v = torch.randn(2, tokens, 2, 16)
    expected = attention.attend_each(1, q, k, v)  # writes k and v into layer 1, then SDPA per sequence
    tables = torch.from_numpy(padded_block_table([c.block_ids for c in chunks], 8))
    lens = torch.tensor([c.length for c in chunks])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    contexts = torch.tensor([c.start + c.length for c in chunks])
    out = paged_varlen_attention(q, cache.k[1], cache.v[1], tables, starts, contexts, max_query_len=13)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    for q_heads, kv_heads, dim, block_size in ((8, 2, 16, 4), (12, 1, 32, 16), (4, 4, 64, 16)):
        for dtype in (torch.float32, torch.bfloat16):
            assert self_check(torch.device("cpu"), dtype, q_heads, kv_heads, dim, block_size) is None


def test_wrapper_refuses_what_the_kernel_cannot_tile():
    from pixtral.engine.triton_prefill import paged_varlen_attention

    cache = torch.zeros(4, 16, 2, 32)
    one = dict(block_tables=torch.zeros(1, 1, dtype=torch.int32), query_start_loc=torch.tensor([0, 1]),
               context_lens=torch.tensor([1]))
    with pytest.raises(ValueError, match="head_dim 24"):  # not a power of two
        paged_varlen_attention(torch.zeros(1, 4, 24), torch.zeros(4, 16, 2, 24), torch.zeros(4, 16, 2, 24), **one)
    with pytest.raises(ValueError, match="6 query heads, 4 kv heads"):
        paged_varlen_attention(torch.zeros(1, 6, 32), torch.zeros(4, 16, 4, 32), torch.zeros(4, 16, 4, 32), **one)
    with pytest.raises(ValueError, match="share one dtype"):
        paged_varlen_attention(torch.zeros(1, 4, 32, dtype=torch.bfloat16), cache, cache, **one)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_varlen_attention(torch.zeros(1, 4, 32), cache, cache, **{**one, "query_start_loc": torch.tensor([1])})
    with pytest.raises(ValueError, match="block_m 8"):
        paged_varlen_attention(torch.zeros(1, 4, 32), cache, cache, **one, block_m=8)
    with pytest.raises(ValueError, match="block_m 16"):  # fewer rows than one query's 32 heads
        paged_varlen_attention(torch.zeros(1, 64, 32), cache, cache, **one, block_m=16)
    empty = paged_varlen_attention(torch.zeros(0, 4, 32), cache, cache, torch.zeros(0, 1, dtype=torch.int32),
                                   torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    assert empty.shape == (0, 4, 32)  # nothing to attend: no launch


def test_tile_height_fits_decode_steps_and_prompt_chunks():
    from pixtral.engine.triton_prefill import block_rows

    assert block_rows(1, 4) == 16  # decode rows, 4 heads a group: 4 queries a tile
    assert block_rows(1, 12) == 16  # Pixtral-Large: one query (12 heads) a tile
    assert block_rows(3, 4) == 16
    assert block_rows(5, 4) == 32
    assert block_rows(512, 4) == 64  # a prompt chunk: 16 queries a tile
    assert block_rows(512, 12) == 64  # 5 queries a tile
    assert block_rows(1, 96) == 128  # never less than one query's heads


def test_the_engines_attention_context_runs_the_step_as_one_launch():
    """`PagedAttention(kernel=True)` (what the model runner uses on a GPU that passed `self_check`)
    gives the per-sequence reference's result for a step of decode rows and prompt chunks."""
    if not INTERPRETED:
        return rerun_interpreted("test_the_engines_attention_context_runs_the_step_as_one_launch")
    from pixtral.engine.attention import PagedAttention
    from pixtral.engine.chunk import Chunk
    from pixtral.engine.kv_cache import PagedKVCache
    from pixtral.model.args import ModelArgs

    torch.manual_seed(1)
    args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=1, n_heads=8, n_kv_heads=2, vocab_size=1)
    blocks = torch.randperm(40).tolist()
    chunks = [Chunk(9, 1, blocks[0:3]), Chunk(0, 13, blocks[3:7]), Chunk(6, 10, blocks[7:11]),
              Chunk(30, 1, blocks[11:19])]
    tokens = sum(c.length for c in chunks)
    q = torch.randn(tokens, 8, 16)
    k, v = torch.randn(2, tokens, 2, 16)
    outs = []
    for kernel in (False, True):
        cache = PagedKVCache(args, 40, 4, torch.device("cpu"), torch.float32)
        torch.manual_seed(2)
        cache.k.normal_()
        cache.v.normal_()
        attention = PagedAttention(cache, chunks, torch.device("cpu"), kernel=kernel)
        outs.append(attention.attend(1, q, k, v) if kernel else attention.attend_each(1, q, k, v))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
