"""The scheduler's token budget: decodes first, and prompt tokens capped while others decode."""

from __future__ import annotations

import pytest
import torch

from pixtral.engine.block_allocator import BlockAllocator
from pixtral.engine.config import EngineConfig
from pixtral.engine.kv_cache_manager import KVCacheManager
from pixtral.engine.request import Prompt, Request
from pixtral.engine.scheduler import Scheduler
from pixtral.generation import SamplingParams

BS = 16


def request(rid: str, n: int) -> Request:
    first = 1000 * (sum(map(ord, rid)) % 100)  # prompts of their own: no prefix-cache hits between them
    return Request(rid, Prompt(list(range(first, first + n))), SamplingParams(max_tokens=64), max_new_tokens=64, image_token_id=None,
                   image_token_counts=[], stop_ids=set())


def scheduler(**config) -> Scheduler:
    cfg = EngineConfig(block_size=BS, num_blocks=4096, **config).resolved(torch.device("cpu"))
    return Scheduler(cfg, KVCacheManager(BlockAllocator(4096), BS))  # room for every step below: no preemption


def step(s: Scheduler) -> list[tuple[str, int]]:
    """One step, as the engine runs it: every chunk computed, every sampling chunk given a token."""
    chunks = s.schedule()
    for c in chunks:
        s.computed(c)
        if c.samples:
            c.request.token_ids.append(1)
    return [(c.request.request_id, c.length) for c in chunks]


def decoding(s: Scheduler, n: int) -> None:
    for i in range(n):
        s.add(request(f"d{i}", 5))
    assert step(s) == [(f"d{i}", 5) for i in range(n)]  # their prompts, in one step


@pytest.mark.parametrize("cap", [1, 100, 256])
def test_prompt_tokens_are_capped_while_others_decode(cap):
    s = scheduler(max_num_batched_tokens=2048, prefill_tokens_while_decoding=cap)
    decoding(s, 16)
    long, short = request("long", 1000), request("short", 30)
    s.add(long)
    s.add(short)
    steps = 0
    while in_prompt := {r.request_id for r in (long, short) if r.remaining > 1}:  # (the last one samples: a decode)
        chunks = step(s)
        assert [c for c in chunks if c[0].startswith("d")] == [(f"d{i}", 1) for i in range(16)]  # every decode, each step
        assert 0 < sum(n for rid, n in chunks if rid in in_prompt) <= cap
        steps += 1
    assert steps >= 1028 // cap  # the cap held: the prompts took that many steps


def test_a_prompt_alone_takes_the_whole_budget_and_zero_means_no_cap():
    s = scheduler(max_num_batched_tokens=512, prefill_tokens_while_decoding=64)
    s.add(request("alone", 1000))
    assert step(s) == [("alone", 512)]  # nothing decodes: no cap
    s = scheduler(max_num_batched_tokens=512, prefill_tokens_while_decoding=0)
    decoding(s, 4)
    s.add(request("long", 1000))
    assert step(s) == [*((f"d{i}", 1) for i in range(4)), ("long", 508)]  # the budget less the decodes


def test_the_cap_defaults_by_device_and_is_checked():
    assert EngineConfig().resolved(torch.device("cpu")).prefill_tokens_while_decoding == 256
    assert EngineConfig().resolved(torch.device("cuda")).prefill_tokens_while_decoding == 0  # no GPU needed to resolve
    for bad in (-1, 2.5, "8"):
        with pytest.raises(ValueError, match="prefill_tokens_while_decoding"):
            EngineConfig(prefill_tokens_while_decoding=bad).resolved(torch.device("cpu"))
