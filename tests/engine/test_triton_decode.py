"""The Triton paged decode kernel, run on the CPU by Triton's interpreter.

Each test re-runs itself in a fresh pytest process with `TRITON_INTERPRET=1` (the outer test
passes when the inner one does).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpret import INTERPRETED
from tests.triton_interpret import rerun_interpreted as _rerun

pytest.importorskip("triton")
rerun_interpreted = functools.partial(_rerun, __file__)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_kernel_matches_attention_over_the_rows_own_tokens(dtype, group, request):
    if not INTERPRETED:
        return rerun_interpreted(request.node.name)
    from pixtral.engine.triton_decode import paged_decode_attention, reference_attention

    torch.manual_seed(0)
    num_blocks, block, kv_heads, dim = 48, 16, 2, 32
    k_cache = torch.randn(num_blocks, block, kv_heads, dim).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim).to(dtype)
    lens = torch.tensor([1, 16, 17, 100, 317])  # one token, a full block, one past it, many tiles
    width = 22
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in lens])
    # Entries past each row's context point far outside the cache: the kernel must never read them.
    for i, n in enumerate(lens.tolist()):
        tables[i, -(-n // block):] = 10**6
    q = torch.randn(len(lens), kv_heads * group, dim).to(dtype)
    ref = reference_attention(q, k_cache, v_cache, tables.clamp(max=num_blocks - 1), lens, torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for splits in (1, 3, 7):  # 7 splits of 64 tokens: most rows leave some splits empty
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, splits)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol, msg=f"splits={splits}")


def test_kernel_refuses_shapes_it_cannot_tile():
    if not INTERPRETED:
        return rerun_interpreted("test_kernel_refuses_shapes_it_cannot_tile")
    from pixtral.engine.triton_decode import paged_decode_attention

    cache = torch.zeros(4, 16, 2, 24)  # head_dim 24: not a power of two
    with pytest.raises(ValueError, match="head_dim 24"):
        paged_decode_attention(torch.zeros(1, 4, 24), cache, cache, torch.zeros(1, 1, dtype=torch.long),
                               torch.ones(1, dtype=torch.long))


def test_num_splits_fills_the_gpu_without_splitting_short_contexts():
    from pixtral.engine.triton_decode import TILE, TOKENS_PER_SPLIT, num_splits

    assert num_splits(1, 8, 256, sm_count=132) == 1  # one tile's worth of context
    assert num_splits(1, 8, 8192, sm_count=132) == 8192 // TOKENS_PER_SPLIT  # long context, few rows
    assert num_splits(64, 8, 8192, sm_count=132) == 1  # 512 programs already fill the GPU
    assert num_splits(2, 8, 200 * TILE, sm_count=132) == 17  # ceil(264 / 16) programs per row
    for batch in (1, 3, 16, 256):
        for context in (1, 15, 64, 1000, 131072):
            assert 1 <= num_splits(batch, 8, context) <= max(1, -(-context // TILE))


def test_graph_decode_step_with_the_kernel_gives_the_reference_tokens(model, processor, monkeypatch):
    """The CUDA-graph decode step, run eagerly with the kernel interpreted: same greedy tokens
    as the plain generation loop, for batches the decoder pads (5 rows in a bucket of 8)."""
    if not INTERPRETED:
        return rerun_interpreted("test_graph_decode_step_with_the_kernel_gives_the_reference_tokens")
    from tiny_model import EagerGraph, assert_chats_match_reference

    from pixtral.engine import LLM
    from pixtral.engine.chunk import Chunk
    from pixtral.engine.cuda_graphs import CudaGraphDecoder

    llm = LLM.from_model(model, processor, num_blocks=256, enable_prefix_caching=False)
    decoder = CudaGraphDecoder(model, llm.engine.cache, max_batch=8, max_model_len=1024)
    assert decoder.use_triton and decoder.fits(8, 1024)  # no gather, so no gather limit
    used = []
    import pixtral.engine.triton_decode as triton_decode

    original = triton_decode.paged_decode_attention
    monkeypatch.setattr(triton_decode, "paged_decode_attention", lambda *a: used.append(a[-1]) or original(*a))

    monkeypatch.setattr(decoder, "_capture", lambda b, w: decoder.graphs.setdefault(
        (b, w), EagerGraph(lambda: decoder._forward(b, w))))
    llm.engine.runner.graphs = decoder
    assert_chats_match_reference(llm, model, processor, max_tokens=8)
    assert used  # the kernel ran
    decoder.capture_all()  # every shape `run` can ask for: all batch buckets, widths 16 * 4^k clamped to 64
    assert {w for _, w in decoder.graphs} == {16, 64} and len(decoder.graphs) == 2 * len(decoder.batch_sizes)
    for n in range(1, 9):
        for context in range(1, 1025, 13):
            assert decoder.fits(n, context)
            assert (decoder._batch(n), decoder._width(-(-context // decoder.block_size))) in decoder.graphs
    with torch.no_grad():  # and agrees with the gather + SDPA path on the logits of one step
        llm.engine.cache.k.normal_()  # finite everywhere: the gather path reads masked slots too
        llm.engine.cache.v.normal_()
        step = [5, 6], [Chunk(3, 1, [1]), Chunk(20, 1, [2, 3])]  # slots 16 + 3 and 3 * 16 + 4
        kernel_logits = decoder.run(*step).clone()
        decoder.use_triton = False
        decoder.graphs.clear()
        torch.testing.assert_close(decoder.run(*step), kernel_logits, rtol=1e-4, atol=1e-4)
    assert F.softmax(kernel_logits, -1).isfinite().all()


def test_graph_decoder_falls_back_when_the_kernel_fails_its_check(model, processor, monkeypatch):
    if not INTERPRETED:
        return rerun_interpreted("test_graph_decoder_falls_back_when_the_kernel_fails_its_check")
    from pixtral.engine import LLM
    from pixtral.engine import triton_decode
    from pixtral.engine.cuda_graphs import CudaGraphDecoder

    llm = LLM.from_model(model, processor, num_blocks=64)
    args = (model, llm.engine.cache, 8, 1024)
    assert CudaGraphDecoder(*args).use_triton  # the real kernel passes
    monkeypatch.setattr(triton_decode, "paged_decode_attention", lambda q, *a: torch.zeros_like(q))
    assert not CudaGraphDecoder(*args).use_triton  # wrong results: gather + SDPA instead
    monkeypatch.setattr(triton_decode, "paged_decode_attention", lambda *a: 1 / 0)
    assert not CudaGraphDecoder(*args).use_triton  # a failure: the same
