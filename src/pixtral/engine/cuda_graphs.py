"""GPU decode step replayed as CUDA graphs: static shapes, padded batch and block-table buckets.

A decode step (one new token per running sequence) is captured once per (batch bucket, block
table width) and replayed: the Python work of the forward pass, hundreds of kernel launches,
becomes one launch. Inputs are copied into static buffers; rows beyond the real batch are
padding that writes only into the reserved null block. Nothing here runs on the CPU path,
and CUDA is touched only when an instance is created.

Attention runs the Triton paged kernel when Triton is installed (it reads keys and values in
place, so every batch bucket and width gets a graph); without it, gather + SDPA, whose copy
bounds the shapes worth capturing (`max_gather_tokens`).
"""

from __future__ import annotations

import logging

import torch

from pixtral.engine import triton_decode
from pixtral.engine.attention import MAX_GATHER_TOKENS, DecodeAttention, padded_block_table, slot_mapping
from pixtral.engine.block_allocator import NULL_BLOCK
from pixtral.engine.chunk import Chunk
from pixtral.engine.kv_cache import PagedKVCache

log = logging.getLogger("pixtral.engine")


def batch_buckets(max_batch: int) -> list[int]:
    sizes = {1, 2, 4, 8, 16, 24} | set(range(32, max_batch + 1, 32)) | {max_batch}
    return sorted(s for s in sizes if s <= max_batch)


MIN_WIDTH = 16  # blocks: the narrowest block table captured


class CudaGraphDecoder:
    def __init__(self, model, cache: PagedKVCache, max_batch: int, max_model_len: int,
                 max_gather_tokens: int = MAX_GATHER_TOKENS, use_triton: bool = True):
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        self.batch_sizes = batch_buckets(max_batch)
        # Each row gathers `width` blocks of keys and values per layer; past this many tokens in
        # all rows, the eager per-sequence path (which gathers only real tokens) is cheaper.
        self.max_gather_tokens = max_gather_tokens
        device = cache.k.device
        self.use_triton = use_triton and triton_decode.available(device)
        if self.use_triton:  # a kernel that does not compile or agree here leaves gather + SDPA in charge
            problem = triton_decode.self_check(device, cache.k.dtype, model.args.n_heads, cache.n_kv_heads,
                                               cache.head_dim, cache.block_size)
            if problem:
                log.warning("Triton decode attention disabled: %s", problem)
                self.use_triton = False
        # Multiprocessors to fill with split contexts (8 stands in when the kernels are interpreted on the CPU).
        self.sm_count = (torch.cuda.get_device_properties(device).multi_processor_count
                         if device.type == "cuda" else 8)
        long = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(max_batch, **long)
        self.positions = torch.zeros(max_batch, **long)
        self.slots = torch.full((max_batch,), NULL_BLOCK * self.block_size, **long)
        self.block_tables = torch.full((max_batch, self.max_blocks), NULL_BLOCK, **long)
        self.context_lens = torch.ones(max_batch, **long)
        # One output buffer for all graphs: each graph copies its logits here, so the only memory
        # a graph keeps is what its own capture could not free (shared pool, replayed one at a time).
        self.logits = torch.empty(max_batch, model.args.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None  # one memory pool shared by all the graphs

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    @property
    def _width_step(self) -> int:
        # Gather + SDPA copies the whole padded table: widths double. The kernel reads only real
        # tokens, so coarser widths (fewer graphs to capture) cost only a larger table copy.
        return 4 if self.use_triton else 2

    def _width(self, blocks: int) -> int:
        width = MIN_WIDTH
        while width < blocks:
            width *= self._width_step
        return min(width, self.max_blocks)

    def _batch(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)

    def fits(self, n: int, max_context: int) -> bool:
        """Whether a decode step of n sequences, the longest max_context tokens, has a graph shape."""
        if n > self.max_batch:
            return False
        width = self._width(-(-max_context // self.block_size))
        return self._within_gather_limit(self._batch(n), width)

    def _within_gather_limit(self, batch: int, width: int) -> bool:
        return self.use_triton or batch * width * self.block_size <= self.max_gather_tokens

    def _splits(self, batch: int, width: int) -> int | None:
        if not self.use_triton:
            return None
        return triton_decode.num_splits(batch, self.cache.n_kv_heads, width * self.block_size, self.sm_count)

    def _forward(self, batch: int, width: int) -> None:
        ctx = DecodeAttention(self.cache, self.positions[:batch], self.slots[:batch],
                              self.block_tables[:batch, :width], self.context_lens[:batch],
                              triton_splits=self._splits(batch, width))
        hidden = self.model.hidden_states(self.model.tok_embeddings(self.ids[:batch]), ctx)
        self.logits[:batch].copy_(self.model.output(hidden))  # copy_ casts to float32: no extra temporary

    def _capture(self, batch: int, width: int) -> torch.cuda.CUDAGraph:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, lazy kernel init)
            for _ in range(2):
                self._forward(batch, width)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(batch, width)
        self.graphs[(batch, width)] = graph
        return graph

    def _pad_inputs(self, n: int) -> None:
        """Point every row from n on at the null block, whatever the last step left there."""
        self.ids[n:].zero_()
        self.positions[n:].zero_()
        self.slots[n:].fill_(NULL_BLOCK * self.block_size)
        self.block_tables[n:].fill_(NULL_BLOCK)
        self.context_lens[n:].fill_(1)

    def capture_all(self) -> None:
        """Capture ahead of time (engine start) so that no request waits for a capture.

        Every width `run` can ask for (MIN_WIDTH times powers of the width step, the last clamped to
        max_blocks as `_width` clamps it), each with every batch bucket within the gather limit.
        """
        self._pad_inputs(0)
        widths = [MIN_WIDTH]
        while widths[-1] < self.max_blocks:
            widths.append(self._width_step * widths[-1])
        for width in sorted({self._width(w) for w in widths}):
            for batch in self.batch_sizes:
                if (batch, width) not in self.graphs and self._within_gather_limit(batch, width):
                    self._capture(batch, width)

    def run(self, ids: list[int], chunks: list[Chunk]) -> torch.Tensor:
        """One decode step: token `ids[i]` at the one position of `chunks[i]`, for n sequences (check
        `fits` first) -> logits [n, vocab], valid until the next run."""
        n = len(ids)
        batch = self._batch(n)
        width = self._width(max(-(-c.end // self.block_size) for c in chunks))
        table = torch.from_numpy(padded_block_table([c.block_ids for c in chunks], width, fill=NULL_BLOCK))
        self._pad_inputs(n)
        self.ids[:n].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor([c.start for c in chunks]), non_blocking=True)
        self.slots[:n].copy_(torch.from_numpy(slot_mapping(chunks, self.block_size)), non_blocking=True)
        self.context_lens[:n].copy_(torch.tensor([c.end for c in chunks]), non_blocking=True)
        self.block_tables[:n, :width].copy_(table, non_blocking=True)
        graph = self.graphs.get((batch, width)) or self._capture(batch, width)
        graph.replay()
        return self.logits[:n]
