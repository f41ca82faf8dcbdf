"""Attention contexts over the paged KV cache, one per engine step.

`PagedAttention` serves any mix of prefill chunks and decodes: a flat run of tokens from many
sequences. It writes the new keys/values into their slots, then, sequence by sequence, gathers
that sequence's blocks and calls SDPA: simple, exact, and each sequence's result does not
depend on what else is in the batch (bit for bit).

`BatchedDecodeAttention` serves steps made only of decodes (one new token per sequence): all
rows in one fused SDPA call per layer, keys gathered to the longest context and masked per row.
It replaces a few kernel calls per sequence and layer by a few per layer, which is most of a
decode step's cost for small models on the CPU.

`DecodeAttention` is the static-shape variant for CUDA graphs: one new token per row, block
tables padded to a fixed width, attention masked by each row's context length. Given a
`splits` count it runs the Triton paged kernel (`triton_decode`) instead, which reads each
row's blocks in place, up to its own length, with no gathered copy and no mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pixtral.engine import triton_decode
from pixtral.engine.kv_cache import PagedKVCache
from pixtral.model.attention import sdpa


# Batched decode attention gathers every row's keys and values padded to the longest context.
# Past this many tokens in all rows, the per-sequence path (which gathers only real tokens) is
# the better deal: 2**18 tokens of NeMo 12B's keys and values are 1 GiB per layer in bf16.
MAX_GATHER_TOKENS = 2**18


@dataclass
class SeqChunk:
    """Tokens [start, start + length) of one sequence, whose KV lives in `block_ids`."""

    start: int
    length: int
    block_ids: list[int]


def slot_mapping(chunks: list[SeqChunk], block_size: int) -> np.ndarray:
    """Flat cache slot of every token of every chunk, in order."""
    out = []
    for c in chunks:
        pos = np.arange(c.start, c.start + c.length)
        blocks = np.asarray(c.block_ids, dtype=np.int64)
        out.append(blocks[pos // block_size] * block_size + pos % block_size)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class PagedAttention:
    def __init__(self, cache: PagedKVCache, chunks: list[SeqChunk], device: torch.device):
        self.cache, self.chunks = cache, chunks
        bs = cache.block_size
        self.positions = torch.from_numpy(
            np.concatenate([np.arange(c.start, c.start + c.length) for c in chunks])).to(device)
        self.slots = torch.from_numpy(slot_mapping(chunks, bs)).to(device)
        self.lengths = [c.length for c in chunks]
        # Blocks holding each chunk's keys so far; None when nothing is cached before the chunk
        # (it then attends to its own k/v alone).
        self.blocks = [None if c.start == 0 else
                       torch.tensor(c.block_ids[: -(-(c.start + c.length) // bs)], dtype=torch.long, device=device)
                       for c in chunks]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.layer(layer)
        k_cache.index_copy_(0, self.slots, k)
        v_cache.index_copy_(0, self.slots, v)
        outs = []
        for c, blocks, qs, ks, vs in zip(self.chunks, self.blocks, q.split(self.lengths), k.split(self.lengths),
                                         v.split(self.lengths)):
            if blocks is None:
                outs.append(sdpa(qs, ks, vs, causal=True))
                continue
            end = c.start + c.length
            keys = self.cache.k[layer].index_select(0, blocks).flatten(0, 1)[:end]
            values = self.cache.v[layer].index_select(0, blocks).flatten(0, 1)[:end]
            # The chunk's queries are the last c.length of the `end` keys: query i sees up to start + i.
            outs.append(sdpa(qs, keys, values, causal=True))
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class DecodeAttention:
    """Decode rows with static shapes: positions/slots [B], block_tables [B, W], context_lens [B].

    Padded rows point their slot at the reserved null block and have context length 1, so
    they write and read only there. Grouped-query heads are folded into the query length:
    q [B, Hq, D] -> [B, Hkv, Hq/Hkv, D], so keys and values are never repeated.

    Masked slots are still read (weight 0), so the cache must hold finite values everywhere:
    it starts zeroed on the GPU, and every write is a model output.
    """

    def __init__(self, cache: PagedKVCache, positions: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, triton_splits: int | None = None):
        self.cache, self.positions, self.slots = cache, positions, slots
        self.block_tables, self.context_lens = block_tables, context_lens
        self.triton_splits = triton_splits  # None: gather + SDPA; else the Triton kernel with this many splits
        if triton_splits is not None:
            return
        width = block_tables.shape[1] * cache.block_size
        keep = torch.arange(width, device=positions.device)[None, :] < context_lens[:, None]
        self.mask = keep[:, None, None, :]  # [B, 1, 1, L]

    def _gather(self, layer_cache: torch.Tensor) -> torch.Tensor:
        """One layer's keys or values [num_blocks, block_size, Hkv, D] -> each row's [B, L, Hkv, D]."""
        rows, _, heads, dim = self.block_tables.shape[0], *layer_cache.shape[1:]
        return layer_cache.index_select(0, self.block_tables.flatten()).view(rows, -1, heads, dim)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.layer(layer)
        k_cache.index_copy_(0, self.slots, k)
        v_cache.index_copy_(0, self.slots, v)
        if self.triton_splits is not None:
            return triton_decode.paged_decode_attention(q, self.cache.k[layer], self.cache.v[layer], self.block_tables,
                                          self.context_lens, self.triton_splits)
        b, hq, d = q.shape
        hkv = k.shape[1]
        keys = self._gather(self.cache.k[layer]).transpose(1, 2)  # [B, Hkv, L, D]
        values = self._gather(self.cache.v[layer]).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), keys, values, attn_mask=self.mask)
        return out.reshape(b, hq, d)


def padded_block_table(block_tables: list[list[int]], width: int, fill: int = 0) -> np.ndarray:
    """Block tables as one [rows, width] array: each row cut or padded (with `fill`) to `width`."""
    table = np.full((len(block_tables), width), fill, dtype=np.int64)
    for row, blocks in enumerate(block_tables):
        used = blocks[:width]
        table[row, : len(used)] = used
    return table


class BatchedDecodeAttention(DecodeAttention):
    """Rows of one new token each; row i at position `starts[i]` with its KV in `block_tables[i]`.

    Every row gathers keys for positions 0..L-1 (L the longest context); positions past a row's
    own context repeat its last written slot and are masked out, so only written, finite
    slots are ever read, and an uninitialised CPU cache is safe. The fused kernel's sums can
    differ from the per-sequence path's in the last bits (the batch pads to the longest
    context), not in greedy tokens (tested). Attention itself is `DecodeAttention`'s.
    """

    def __init__(self, cache: PagedKVCache, starts: list[int], block_tables: list[list[int]],
                 device: torch.device):
        self.cache, self.triton_splits = cache, None
        bs = cache.block_size
        pos = np.asarray(starts, dtype=np.int64)
        longest = int(pos.max()) + 1
        width = -(-longest // bs)
        table = padded_block_table(block_tables, width)
        keys = np.minimum(np.arange(longest)[None, :], pos[:, None])  # [B, L], clamped to each row's last
        gather = np.take_along_axis(table, keys // bs, axis=1) * bs + keys % bs
        rows = np.arange(len(starts))
        self.positions = torch.from_numpy(pos).to(device)
        self.slots = torch.from_numpy(gather[rows, pos]).to(device)
        self.gather = torch.from_numpy(gather.reshape(-1)).to(device)
        self.longest = longest
        keep = np.arange(longest)[None, :] <= pos[:, None]
        self.mask = None if keep.all() else torch.from_numpy(keep[:, None, None, :]).to(device)

    def _gather(self, layer_cache: torch.Tensor) -> torch.Tensor:
        rows, heads, dim = len(self.positions), *layer_cache.shape[2:]
        return layer_cache.flatten(0, 1).index_select(0, self.gather).view(rows, self.longest, heads, dim)
