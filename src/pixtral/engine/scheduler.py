"""Continuous batching with chunked prefill: which tokens of which requests run this step.

Every step has a token budget. Running requests go first, in arrival order: a decoding
request takes one token, a request still reading its prompt takes a chunk of what is left of
the budget after the pending decodes, so a long prompt never stalls the decodes. Then waiting
requests are admitted while the budget, the sequence limit and the free KV blocks allow; each
starts after the longest prefix of its blocks already in the prefix cache.

When a running request needs a block and none is free, the most recently admitted request is
preempted: its blocks are released (full ones stay in the prefix cache) and it waits at the
front of the queue to be recomputed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from pixtral.engine.block_allocator import BlockAllocator
from pixtral.engine.config import EngineConfig
from pixtral.engine.request import Request, Status


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first token to compute
    length: int  # how many

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so its last logits pick a token."""
        return self.start + self.length == self.request.num_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: BlockAllocator):
        self.config, self.allocator = config, allocator
        self.block_size = config.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.watermark = max(1, allocator.num_usable // 100)  # blocks kept free for running decodes
        self.num_preemptions = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        pending_decodes = sum(1 for r in self.running if r.remaining == 1)
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            decode = req.remaining == 1
            pending_decodes -= decode
            n = min(req.remaining, budget if decode else budget - pending_decodes)
            if n <= 0:
                i += 1
                continue
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running.pop()  # lowest priority: admitted last, not scheduled yet
                pending_decodes -= victim is not req and victim.remaining == 1
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status == Status.RUNNING:
                chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
                budget -= n
                i += 1
        if not preempted:  # no room for newcomers while we are evicting
            self._admit(chunks, budget)
        return chunks

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> None:
        bs, alloc = self.block_size, self.allocator
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits: list[int] = []
            if alloc.enable_caching:
                hashes = req.update_block_hashes(bs)
                hits = alloc.lookup(hashes[: (req.num_tokens - 1) // bs])  # leave a token to compute
            computed = len(hits) * bs
            n = min(req.num_tokens - computed, budget)
            need = -(-(computed + n) // bs) - len(hits)
            available = alloc.num_free - alloc.num_free_among(hits)
            if need > available - (self.watermark if self.running else 0):
                break
            alloc.share(hits)
            req.block_ids = hits + alloc.allocate(need)
            req.num_computed_tokens = computed
            req.num_registered_blocks = len(hits)
            if req.num_cached_tokens is None:  # first admission: count prefix-cache hits
                req.num_cached_tokens = computed
                req.first_scheduled_time = time.monotonic()
                self.prefix_query_tokens += req.num_tokens
                self.prefix_hit_tokens += computed
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            chunks.append(ScheduledChunk(req, computed, n))
            budget -= n

    def _grow(self, req: Request, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        req.block_ids += self.allocator.allocate(need)
        return True

    def _preempt(self, req: Request) -> None:
        self.allocator.release(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_registered_blocks = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ after the step
    def computed(self, chunk: ScheduledChunk) -> None:
        """The chunk's keys and values are in the cache: advance, and publish its full blocks."""
        req = chunk.request
        req.num_computed_tokens = chunk.start + chunk.length
        full = req.num_computed_tokens // self.block_size
        if self.allocator.enable_caching and full > req.num_registered_blocks:
            hashes = req.update_block_hashes(self.block_size)
            for b in range(req.num_registered_blocks, full):
                self.allocator.register(req.block_ids[b], hashes[b])
            req.num_registered_blocks = full

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request and release its blocks at once."""
        if req.status == Status.RUNNING:
            self.running.remove(req)
        elif req.status == Status.WAITING:
            self.waiting.remove(req)
        self.allocator.release(req.block_ids)
        req.block_ids = []
        req.status = Status.FINISHED
