"""The engine's parts on their own: allocator, hashes, caches, attention contexts, scheduler."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_model import EagerGraph, assert_chats_match_reference, image_uri, user

from pixtral.engine import LLM, Engine, EngineConfig, Prompt
from pixtral.engine.attention import DecodeAttention, PagedAttention, slot_mapping
from pixtral.engine.block_allocator import NULL_BLOCK, BlockAllocator
from pixtral.engine.chunk import Chunk
from pixtral.engine.encoder_cache import EncoderCache
from pixtral.engine.inputs import chat_prompt
from pixtral.engine.kv_cache import PagedKVCache
from pixtral.engine.prefix_cache import hash_block, hash_image
from pixtral.generation import SamplingParams
from pixtral.model.attention import sdpa


def test_block_allocator_refcounts_and_eviction_order():
    alloc = BlockAllocator(6)
    assert alloc.num_usable == 5 and alloc.num_free == 5
    a = alloc.allocate(3)
    assert NULL_BLOCK not in a and alloc.num_used == 3
    alloc.register(a[0], b"h0")
    alloc.register(a[1], b"h1")
    assert alloc.lookup([b"h0", b"h1", b"h2"]) == a[:2]
    alloc.share(a[:2])  # a second request on the same prefix
    alloc.release(a)
    assert alloc.num_used == 2  # still held by the sharer
    alloc.release(a[:2])
    assert alloc.num_used == 0 and alloc.num_cached == 2
    # Uncached blocks are handed out before cached ones; cached ones tail first.
    fresh = alloc.allocate(3)
    assert a[0] not in fresh and a[1] not in fresh
    alloc.allocate(1)
    assert alloc.lookup([b"h0", b"h1"]) == [a[0]]  # h1 (the tail) was evicted first
    with pytest.raises(RuntimeError):
        alloc.allocate(2)


def test_block_hashes_depend_on_image_content():
    img1, img2 = torch.zeros(3, 16, 16), torch.zeros(3, 16, 16)
    assert hash_image(img1) == hash_image(img2)
    img2[0, 0, 0] = 1e-3
    assert hash_image(img1) != hash_image(img2)
    tokens = list(range(16))
    assert hash_block(None, tokens, [hash_image(img1)]) != hash_block(None, tokens, [hash_image(img2)])
    assert hash_block(b"x" * 16, tokens) != hash_block(b"y" * 16, tokens)


def test_encoder_cache_evicts_least_recently_used():
    cache = EncoderCache(capacity_tokens=10)
    cache.put(b"a", torch.zeros(4, 2))
    cache.put(b"b", torch.zeros(4, 2))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"c", torch.zeros(4, 2))
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"c") is not None


def filled_cache(args, tables: list[list[int]], lengths: list[int], unwritten: float) -> PagedKVCache:
    """12 blocks of 4 slots: random keys/values for tokens [0, n) of each sequence, `unwritten` elsewhere."""
    cache = PagedKVCache(args, 12, 4, torch.device("cpu"), torch.float32)
    cache.k.fill_(unwritten)
    cache.v.fill_(unwritten)
    for layer in range(args.n_layers):
        k_flat, v_flat = cache.layer(layer)
        for table, n in zip(tables, lengths):
            slots = torch.from_numpy(slot_mapping([Chunk(0, n, table)], 4))
            k_flat[slots] = torch.randn(n, args.n_kv_heads, args.head_dim)
            v_flat[slots] = torch.randn(n, args.n_kv_heads, args.head_dim)
    return cache


def test_decode_attention_static_shapes_match_paged(model):
    """The CUDA-graph decode context, run eagerly on the CPU, equals the per-sequence one."""
    args = model.args
    torch.manual_seed(0)
    tables = [[3, 5, 1], [7], [2, 9, 10, 11]]
    lengths = [9, 3, 12]  # tokens already cached before this step
    cache = filled_cache(args, tables, lengths, unwritten=0.0)
    q = torch.randn(3, args.n_heads, args.head_dim)
    k = torch.randn(3, args.n_kv_heads, args.head_dim)
    v = torch.randn(3, args.n_kv_heads, args.head_dim)
    chunks = [Chunk(n, 1, t) for n, t in zip(lengths, tables)]
    paged = PagedAttention(cache, chunks, torch.device("cpu")).attend(0, q, k, v)
    # Static: batch padded to 4 rows, block tables to width 4; the pad row uses the null block.
    width = 4
    table = torch.zeros(4, width, dtype=torch.long)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    slots = torch.tensor(slot_mapping(chunks, 4).tolist() + [0])
    ctx = DecodeAttention(cache, torch.tensor(lengths + [0]), slots, table, torch.tensor([n + 1 for n in lengths] + [1]))
    pad = lambda t: torch.cat([t, torch.zeros(1, *t.shape[1:])])
    static = ctx.attend(0, pad(q), pad(k), pad(v))[:3]
    torch.testing.assert_close(static, paged, rtol=1e-5, atol=1e-5)
    # And both equal plain attention over the sequence's keys.
    k_flat, v_flat = cache.layer(0)
    for i, (t, n) in enumerate(zip(tables, lengths)):
        s = torch.from_numpy(slot_mapping([Chunk(0, n + 1, t)], 4))
        torch.testing.assert_close(paged[i: i + 1], sdpa(q[i: i + 1], k_flat[s], v_flat[s]))


def mixed_step(args, chunks: list[Chunk], cached: list[int], seed: int):
    """A cache holding each sequence's first `cached` tokens (NaN everywhere else) and this step's q/k/v."""
    torch.manual_seed(seed)
    cache = filled_cache(args, [c.block_ids for c in chunks], cached, unwritten=float("nan"))
    tokens = sum(c.length for c in chunks)
    q = torch.randn(tokens, args.n_heads, args.head_dim)
    k = torch.randn(tokens, args.n_kv_heads, args.head_dim)
    v = torch.randn(tokens, args.n_kv_heads, args.head_dim)
    return cache, q, k, v


MIXED_STEPS = {  # (start, length, blocks of 4 slots) per sequence; `start` tokens are cached before
    "decodes only": [(9, 1, [3, 5, 1]), (3, 1, [7]), (12, 1, [2, 9, 10, 11]), (4, 1, [4, 6])],
    "a new prompt among decodes": [(9, 1, [3, 5, 1]), (0, 7, [8, 0]), (3, 1, [7])],
    "a prefix hit: a chunk after cached blocks": [(8, 5, [3, 5, 1, 4]), (2, 1, [7])],
    "chunks crossing block boundaries": [(3, 6, [3, 5, 1]), (0, 4, [7]), (5, 3, [2, 9])],
    "single-token chunks of prompts": [(0, 1, [3]), (6, 1, [7, 5]), (0, 9, [2, 9, 10]), (11, 1, [4, 6, 8])],
    "several prompt chunks of different lengths": [(0, 10, [3, 5, 1]), (4, 2, [7, 6]), (7, 5, [2, 9, 10])],
}


@pytest.mark.parametrize("name", list(MIXED_STEPS))
def test_batched_attention_matches_the_per_sequence_reference(model, name):
    """Decode rows and prompt chunks of many sequences in batched calls equal one call per sequence,
    and read only written slots: the rest of the cache is NaN."""
    args = model.args
    chunks = [Chunk(start, length, blocks) for start, length, blocks in MIXED_STEPS[name]]
    cached = [c.start for c in chunks]
    cache, q, k, v = mixed_step(args, chunks, cached, seed=len(name))
    ctx = PagedAttention(cache, chunks, torch.device("cpu"))
    assert len(ctx.groups) == len({c.length == 1 for c in chunks}) and not ctx.alone  # one call per kind of row
    batched = ctx.attend(1, q, k, v)
    reference_cache, *_ = mixed_step(args, chunks, cached, seed=len(name))
    reference = PagedAttention(reference_cache, chunks, torch.device("cpu")).attend_each(1, q, k, v)
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    # A sequence's rows do not depend on the others of the step.
    first = PagedAttention(reference_cache, chunks[:1], torch.device("cpu")).attend(1, q[: chunks[0].length],
                                                                                  k[: chunks[0].length],
                                                                                  v[: chunks[0].length])
    torch.testing.assert_close(batched[: chunks[0].length], first, rtol=1e-5, atol=1e-5)


def test_long_prefill_does_not_stall_decodes(model, processor):
    engine = Engine(model, processor, EngineConfig(num_blocks=128, max_num_batched_tokens=32, max_num_seqs=4))
    engine.add_request(chat_prompt(processor, [user("hi")]), SamplingParams(temperature=0, max_tokens=40))
    while not any(d.token_ids for d in engine.step()):
        pass  # the short request is decoding now
    long_prompt = chat_prompt(processor, [user("Look closely. " * 40, image_uri(7, (128, 128)))])
    assert len(long_prompt.token_ids) > 190
    engine.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=2), request_id="long")
    steps = 0
    while engine.requests["long"].num_computed_tokens < len(long_prompt.token_ids):
        deltas = engine.step()
        steps += 1
        assert any(d.request_id != "long" and d.token_ids for d in deltas)  # the decode went on
    assert steps >= 190 // 32


def test_images_of_several_requests_are_encoded_in_one_pass(model, processor, monkeypatch):
    llm = LLM.from_model(model, processor, num_blocks=256)
    calls = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda images: calls.append(len(images)) or original(images))
    convs = [[user(f"Picture {i}", image_uri(40 + i))] for i in range(5)]
    llm.chat(convs, SamplingParams(temperature=0, max_tokens=2))
    assert calls == [5]
    llm.chat(convs[:2], SamplingParams(temperature=0, max_tokens=2))  # repeated images: reused
    assert calls == [5]


def test_abort_frees_blocks_at_once(model, processor):
    engine = Engine(model, processor, EngineConfig(num_blocks=64))
    rid = engine.add_request(chat_prompt(processor, [user("Tell me a story. " * 10)]),
                             SamplingParams(temperature=0, max_tokens=100))
    engine.step()
    engine.step()
    assert engine.stats().kv_blocks_used > 0 and engine.stats().num_running == 1
    assert engine.abort(rid)
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()
    assert not engine.abort(rid)


def test_bad_prompts_are_refused(model, processor):
    engine = Engine(model, processor, EngineConfig(num_blocks=64))
    ok = SamplingParams(max_tokens=2)
    with pytest.raises(Exception, match="empty"):
        engine.check(Prompt([]), ok)
    with pytest.raises(Exception, match="IMG"):
        engine.check(Prompt([1, model.image_token_id, 5]), ok)  # an [IMG] slot with no image
    with pytest.raises(Exception, match="token ids"):
        engine.check(Prompt([1, 10**9]), ok)


def test_cuda_graph_decoder_inputs_on_cpu(model, processor, monkeypatch):
    """The graph decoder's bucketing, padding and static buffers, with 'graphs' that run eagerly.

    Capturing needs CUDA; everything around it (what the captured step reads and writes) is
    checked here: the greedy tokens equal the reference loop's.
    """
    from pixtral.engine.cuda_graphs import CudaGraphDecoder

    llm = LLM.from_model(model, processor, num_blocks=256, enable_prefix_caching=False)
    llm.engine.cache.k.zero_()  # as on the GPU: masked slots are read, so they must hold finite values
    llm.engine.cache.v.zero_()
    decoder = CudaGraphDecoder(model, llm.engine.cache, max_batch=8, max_model_len=1024, max_gather_tokens=2**12)
    captured = []

    def capture(batch, width):
        captured.append((batch, width))
        graph = decoder.graphs[(batch, width)] = EagerGraph(lambda: decoder._forward(batch, width))
        return graph

    monkeypatch.setattr(decoder, "_capture", capture)
    llm.engine.runner.graphs = decoder
    assert_chats_match_reference(llm, model, processor, max_tokens=12)
    assert captured and all(b in decoder.batch_sizes and w >= 16 for b, w in captured)
    assert (8, 16) in captured or (4, 16) in captured  # padded batches were used
    assert not decoder.fits(9, 10) and not decoder.fits(8, 1024)  # too many rows / too many gathered tokens


def test_cuda_graph_capture_all_covers_every_shape_run_can_ask_for(model, processor, monkeypatch):
    """After `capture_all`, no decode step that `fits` captures anything (with 'graphs' recorded
    instead of captured, as above): widths are clamped to the longest block table."""
    from pixtral.engine.cuda_graphs import CudaGraphDecoder

    llm = LLM.from_model(model, processor, num_blocks=64)
    decoder = CudaGraphDecoder(model, llm.engine.cache, max_batch=8, max_model_len=600, max_gather_tokens=2**12)
    captured = []
    monkeypatch.setattr(decoder, "_capture", lambda b, w: captured.append((b, w)) or decoder.graphs.setdefault((b, w), 0))
    decoder.capture_all()
    assert decoder.max_blocks == 38 and {w for _, w in captured} == {16, 32, 38}
    assert len(captured) == len(set(captured))
    for n in range(1, 9):
        for context in range(1, 601, 7):
            if decoder.fits(n, context):
                width = decoder._width(-(-context // decoder.block_size))
                assert (decoder._batch(n), width) in decoder.graphs, (n, context)


def test_steps_past_the_gather_limit_take_the_per_sequence_path(model, processor, monkeypatch):
    """Groups whose padded gather would be too large run one call per sequence, with the same tokens."""
    import pixtral.engine.attention as attention

    convs = [[user(f"Picture {i}", image_uri(60 + i))] for i in range(3)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    options = dict(num_blocks=256, max_num_batched_tokens=40, max_num_seqs=4)  # chunked prompts beside decodes
    batched = LLM.from_model(model, processor, **options).chat(convs, greedy)
    alone = []
    original = attention.PagedAttention._attend_one
    monkeypatch.setattr(attention.PagedAttention, "_attend_one",
                        lambda self, *a: alone.append(1) or original(self, *a))
    monkeypatch.setattr(attention, "MAX_GATHER_TOKENS", 1)
    per_sequence = LLM.from_model(model, processor, **options).chat(convs, greedy)
    assert alone
    assert [o.outputs[0].token_ids for o in per_sequence] == [o.outputs[0].token_ids for o in batched]


def test_image_features_of_a_packed_pass_are_separate_copies(model, processor):
    """The encoder cache keeps each image's features; they must not pin the whole packed pass."""
    llm = LLM.from_model(model, processor, num_blocks=256)
    images = [chat_prompt(processor, [user("Hi", image_uri(70 + i))]).images[0] for i in range(2)]
    first, second = llm.engine.runner.encode_images(images)
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert first.untyped_storage().nbytes() == first.numel() * first.element_size()


def test_the_cpu_kv_budget_follows_the_memory_left(model, monkeypatch):
    """Without an explicit budget, the CPU cache may grow to a fifth of the memory (at most 4 GiB)
    and to half of what is still available once the model is loaded (a large model leaves less)."""
    import pixtral.engine.config as config
    from pixtral.engine.kv_cache import bytes_per_block, num_blocks_for

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ceiling = min(4 * 2**30, total // 5)
    per_block = bytes_per_block(model.args, 16, model.dtype)
    monkeypatch.setattr(config, "available_memory_bytes", lambda: 2**40)
    assert config.default_cpu_kv_bytes() == ceiling
    monkeypatch.setattr(config, "available_memory_bytes", lambda: 64 * 2**20)
    assert config.default_cpu_kv_bytes() == 32 * 2**20
    assert num_blocks_for(model, EngineConfig(block_size=16).resolved(model.device)) == 32 * 2**20 // per_block
    monkeypatch.setattr(config, "available_memory_bytes", lambda: 3 * per_block)
    with pytest.raises(ValueError, match="holds 1 blocks of 16 tokens"):
        num_blocks_for(model, EngineConfig(block_size=16).resolved(model.device))
    monkeypatch.undo()
    assert 0 < config.available_memory_bytes() <= total  # Linux's MemAvailable, read for real
