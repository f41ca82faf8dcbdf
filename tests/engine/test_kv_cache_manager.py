"""The KV-cache manager on its own: block tables, prefix hits, sharing, preemption, chained hashes."""

from __future__ import annotations

import torch

from pixtral.engine.block_allocator import BlockAllocator
from pixtral.engine.config import EngineConfig
from pixtral.engine.kv_cache_manager import KVCacheManager
from pixtral.engine.prefix_cache import hash_block, hash_image
from pixtral.engine.request import Prompt, Request
from pixtral.engine.scheduler import Scheduler
from pixtral.generation import SamplingParams

BS = 4
IMG = 99  # the [IMG] token of these requests


def request(rid: str, tokens: list[int], images: list[torch.Tensor] = (), counts: list[int] = ()) -> Request:
    return Request(rid, Prompt(list(tokens), list(images)), SamplingParams(max_tokens=8), max_new_tokens=8,
                   image_token_id=IMG, image_token_counts=list(counts), stop_ids=set())


def manager(num_blocks: int = 16, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(BlockAllocator(num_blocks, caching), BS)


def test_a_request_knows_tokens_and_the_manager_knows_blocks():
    req = request("a", range(10))
    for name in ("block_ids", "block_hashes", "num_registered_blocks", "update_block_hashes", "decoder", "stops"):
        assert not hasattr(req, name)
    kv = manager()
    assert kv.block_table("a") == []
    assert kv.allocate(req, 10)
    table = kv.block_table("a")
    assert len(table) == 3 and kv.num_used_blocks == 3 and 0 not in table  # block 0 is never handed out
    assert kv.allocate(req, 12) and kv.block_table("a") is table and len(table) == 3  # still fits
    assert kv.allocate(req, 13) and len(table) == 4  # grown in place: a chunk holding the list sees it


def test_prefix_hits_leave_a_token_to_compute_and_share_blocks():
    kv = manager()
    a = request("a", range(10))
    assert kv.computed_prefix(a) == ([], 0)
    kv.allocate(a, 10)
    kv.cache_full_blocks(a, 10)  # two full blocks, the third holds 2 tokens
    assert kv.num_cached_blocks == 2

    b = request("b", [*range(8), 50, 51, 52])  # the same first 8 tokens
    hits, tokens = kv.computed_prefix(b)
    assert hits == kv.block_table("a")[:2] and tokens == 8
    assert kv.allocate(b, 11, hits)
    assert kv.block_table("b")[:2] == hits and kv.num_used_blocks == 4  # 2 shared + a's third + b's own
    exact = request("c", range(8))  # all of it cached: the last block is computed again for its logits
    assert kv.computed_prefix(exact) == (hits[:1], 4)

    kv.free(a)
    assert kv.num_used_blocks == 3  # the shared ones stay with b
    kv.free(b)
    assert kv.num_used_blocks == 0 and kv.num_cached_blocks == 2  # freed, still findable
    assert kv.computed_prefix(b) == (hits, 8)


def test_allocation_that_does_not_fit_changes_nothing():
    kv = manager(num_blocks=5)  # 4 usable
    a, b = request("a", range(8)), request("b", range(100, 108))
    assert kv.allocate(a, 8)
    assert not kv.allocate(b, 12)  # 3 blocks, 2 free
    assert kv.block_table("b") == [] and kv.num_free_blocks == 2
    assert not kv.allocate(b, 8, reserve=1)  # would leave none of the one kept back
    assert kv.allocate(b, 8) and kv.num_free_blocks == 0
    assert not kv.allocate(a, 9) and len(kv.block_table("a")) == 2


def test_hits_whose_blocks_are_free_count_against_the_free_blocks():
    kv = manager(num_blocks=5)
    a = request("a", range(9))
    kv.allocate(a, 9)
    kv.cache_full_blocks(a, 9)
    kv.free(a)  # 4 free, 2 of them cached
    b = request("b", [*range(8), 7, 7, 7, 7, 7, 7, 7, 7])
    hits, tokens = kv.computed_prefix(b)
    assert len(hits) == 2 and tokens == 8
    # 16 tokens need 4 blocks: the 2 hits (taken off the free list) and 2 new: all 4 free ones.
    assert not kv.allocate(b, 16, hits, reserve=1)
    assert kv.block_table("b") == [] and kv.num_free_blocks == 4
    assert kv.allocate(b, 16, hits) and kv.num_free_blocks == 0


def test_hashes_chain_over_blocks_and_images():
    img1, img2 = torch.zeros(3, 16, 16), torch.ones(3, 16, 16)
    # Prompt: 4 text tokens, then 3 [IMG] slots of one image (the second block), then text.
    tokens = [1, 2, 3, 4, IMG, IMG, IMG, 5, 6, 7, 8, 9]
    kv = manager()
    one, other = request("one", tokens, [img1], [3]), request("other", tokens, [img2], [3])
    h1, h2 = list(kv.block_hashes(one)), kv.block_hashes(other)
    assert len(h1) == 3
    assert h1[0] == h2[0]  # text before the image is shared
    assert h1[1] != h2[1] and h1[2] != h2[2]  # from the image's block on, everything after depends on it
    expected, parent = [], None
    for b, images in enumerate(([], [hash_image(img1)], [])):
        parent = hash_block(parent, tokens[b * BS: (b + 1) * BS], images)
        expected.append(parent)
    assert h1 == expected
    shifted = request("shifted", [0, *tokens[1:]], [img1], [3])  # only the first token differs
    assert all(x != y for x, y in zip(kv.block_hashes(shifted), h1))  # chained: no later block matches

    one.token_ids += [10, 11, 12, 13]  # generated tokens: the hashes extend to the new full block
    assert kv.block_hashes(one)[:3] == h1 and len(kv.block_hashes(one)) == 4


def test_no_prefix_caching_no_hits():
    kv = manager(caching=False)
    a = request("a", range(9))
    kv.allocate(a, 9)
    kv.cache_full_blocks(a, 9)
    kv.free(a)
    assert kv.num_cached_blocks == 0 and kv.computed_prefix(request("b", range(9))) == ([], 0)


def test_preemption_frees_the_victims_blocks_and_it_comes_back_from_the_prefix_cache():
    # 7 usable blocks of 4; two prompts of 12 tokens take 3 blocks each, then decode.
    kv = manager(num_blocks=8)
    config = EngineConfig(block_size=BS, max_num_seqs=4, max_num_batched_tokens=64).resolved(torch.device("cpu"))
    scheduler = Scheduler(config, kv)
    first, second = request("first", range(12)), request("second", range(100, 112))
    scheduler.add(first)
    scheduler.add(second)

    def run_step(new_tokens):
        chunks = scheduler.schedule()
        for c in chunks:
            assert c.block_ids is kv.block_table(c.request.request_id)  # the chunk carries the table
            scheduler.computed(c)
            if c.samples:
                c.request.token_ids.append(new_tokens[c.request.request_id])
        return chunks

    chunks = run_step({"first": 1, "second": 2})
    assert [(c.request.request_id, c.start, c.length) for c in chunks] == [("first", 0, 12), ("second", 0, 12)]
    assert kv.num_used_blocks == 6 and kv.num_cached_blocks == 6
    run_step({"first": 3, "second": 4})  # position 12 of each: one more block each, only one free
    assert scheduler.num_preemptions == 1 and second.num_preemptions == 1
    assert kv.block_table("second") == [] and second.num_computed_tokens == 0
    assert list(scheduler.waiting) == [second] and len(kv.block_table("first")) == 4
    # Its full blocks stayed in the prefix cache: when it comes back it starts after them.
    scheduler.finish(first)
    assert kv.num_used_blocks == 0
    (chunk,) = run_step({"second": 5})
    assert chunk.request is second and chunk.start == 12 and chunk.length == 1
    scheduler.finish(second)
    assert kv.num_used_blocks == 0 and not scheduler.has_unfinished()
