"""Continuous batching with chunked prefill: which tokens of which requests run this step.

Every step has a token budget. Running requests go first, in arrival order: a decoding
request takes one token, a request still reading its prompt takes a chunk of what is left of
the budget after the pending decodes, so a long prompt never stalls the decodes. While any
request decodes, prompt chunks together take at most `prefill_tokens_while_decoding` tokens a
step, so that the decoding requests' steps stay short (a lone prompt takes the whole budget). Then waiting
requests are admitted while the budget, the sequence limit and the free KV blocks allow; each
starts after the longest prefix of its blocks already in the prefix cache.

When a running request needs a block and none is free, the most recently admitted request is
preempted: its blocks are released (full ones stay in the prefix cache) and it waits at the
front of the queue to be recomputed.

The scheduler decides tokens; blocks are the `KVCacheManager`'s, which it asks for room.
"""

from __future__ import annotations

import time
from collections import deque

from pixtral.engine.chunk import Chunk
from pixtral.engine.config import EngineConfig
from pixtral.engine.kv_cache_manager import KVCacheManager
from pixtral.engine.request import Request, Status

# Prompt tokens a step computes of a request that asks for prompt logprobs: each returns a row of
# logits (0.5 MB at a 131072-token vocabulary, twice with its log-softmax), beyond what the engine
# reserves memory for, so such a prompt runs in chunks of at most this many.
PROMPT_LOGPROBS_CHUNK = 512


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager):
        self.config, self.kv = config, kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.watermark = max(1, kv.num_blocks // 100)  # blocks kept free for running decodes
        self.num_preemptions = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    @property
    def has_room(self) -> bool:
        """Whether one more sequence may run now."""
        return len(self.running) < self.config.max_num_seqs

    def add_forked(self, request: Request, num_computed_tokens: int) -> None:
        """Run a request whose first tokens are computed already (a choice forked off its prompt, when
        `has_room`: the KV-cache manager gave it blocks)."""
        request.num_computed_tokens = num_computed_tokens
        request.metrics.first_scheduled_time = time.monotonic()
        request.status = Status.RUNNING
        self.running.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> list[Chunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[Chunk] = []
        pending_decodes = sum(1 for r in self.running if r.remaining == 1)
        cap = self.config.prefill_tokens_while_decoding
        prompt_budget = cap if pending_decodes and cap else budget
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            decode = req.remaining == 1
            pending_decodes -= decode
            n = min(req.remaining, budget if decode else min(budget - pending_decodes, prompt_budget))
            n = self._cap(req, n)
            if n <= 0:
                i += 1
                continue
            while not self.kv.allocate(req, req.num_computed_tokens + n):
                victim = self.running.pop()  # lowest priority: admitted last, not scheduled yet
                pending_decodes -= victim is not req and victim.remaining == 1
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status == Status.RUNNING:
                chunks.append(self._chunk(req, n))
                budget -= n
                prompt_budget -= 0 if decode else n
                i += 1
        if not preempted:  # no room for newcomers while we are evicting
            self._admit(chunks, min(budget, prompt_budget))
        return chunks

    @staticmethod
    def _cap(req: Request, n: int) -> int:
        return min(n, PROMPT_LOGPROBS_CHUNK) if req.prompt_logprobs is not None else n

    def _chunk(self, req: Request, n: int) -> Chunk:
        return Chunk(req.num_computed_tokens, n, self.kv.block_table(req.request_id), req)

    def _admit(self, chunks: list[Chunk], budget: int) -> None:
        """Start waiting requests; `budget`: the prompt tokens this step still takes."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits, computed = self.kv.computed_prefix(req)
            n = self._cap(req, min(req.num_tokens - computed, budget))
            if not self.kv.allocate(req, computed + n, hits, reserve=self.watermark if self.running else 0):
                break
            req.num_computed_tokens = computed
            if req.num_cached_tokens is None:  # first admission: count prefix-cache hits
                req.num_cached_tokens = computed
                req.metrics.first_scheduled_time = time.monotonic()
                self.prefix_query_tokens += req.num_tokens
                self.prefix_hit_tokens += computed
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            chunks.append(self._chunk(req, n))
            budget -= n

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ after the step
    def computed(self, chunk: Chunk) -> None:
        """The chunk's keys and values are in the cache: advance, and publish its full blocks."""
        req = chunk.request
        req.num_computed_tokens = chunk.end
        self.kv.cache_full_blocks(req, req.num_computed_tokens)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request and release its blocks at once."""
        if req.status == Status.RUNNING:
            self.running.remove(req)
        elif req.status == Status.WAITING:
            self.waiting.remove(req)
        self.kv.free(req)
        self.kv.free_block_hashes(req)
        req.status = Status.FINISHED
