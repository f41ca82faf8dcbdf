"""Attention contexts over the paged KV cache, one per engine step.

`PagedAttention` serves any mix of prefill chunks and decodes: a flat run of tokens from many
sequences, given as the scheduler's `Chunk`s (it reads their positions and block tables only).
It writes the new keys and values into their slots, then attends in batched calls, one per kind
of row rather than one per sequence:

- decode rows (one query each): all in one call, each row's keys gathered to the longest context
  and masked past its own;
- prompt chunks (many queries each): on the CPU all in one call, queries padded to the longest
  chunk, keys to the longest context, each query seeing its sequence up to its own position. On
  the GPU each chunk keeps its own call, on its own keys with the causal diagonal moved (a masked
  call would fall back to the math kernel there, which materialises every score).

Two calls rather than one because the shapes differ: padding decode rows to a prompt chunk's
length would multiply their attention work by that length. On the GPU, with `kernel=True` (the
model runner's choice, after `triton_prefill.self_check`), the whole step is one launch of the
Triton varlen kernel instead, reading every sequence's blocks in place. Past `MAX_GATHER_TOKENS` gathered
keys a group falls back to one call per sequence (`attend_each`, also the reference the tests
compare with), which gathers only real tokens. Batched and per-sequence results agree up to
float32 summation order; greedy tokens are the same (tested).

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

from pixtral.engine import triton_decode, triton_prefill
from pixtral.engine.chunk import Chunk
from pixtral.engine.kv_cache import PagedKVCache
from pixtral.model.attention import sdpa


# Batched decode attention gathers every row's keys and values padded to the longest context.
# Past this many tokens in all rows, the per-sequence path (which gathers only real tokens) is
# the better deal: 2**18 tokens of NeMo 12B's keys and values are 1 GiB per layer in bf16.
MAX_GATHER_TOKENS = 2**18


def slot_mapping(chunks: list[Chunk], block_size: int) -> np.ndarray:
    """Flat cache slot of every token of every chunk, in order."""
    out = []
    for c in chunks:
        pos = np.arange(c.start, c.end)
        blocks = np.asarray(c.block_ids, dtype=np.int64)
        out.append(blocks[pos // block_size] * block_size + pos % block_size)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@dataclass
class Group:
    """Sequences attended in one call: `rows` [T_g] of the flat batch, padded to [B, L] queries
    (`query_slots`, where each row goes) against [B, C] gathered keys (`gather`, flat cache slots,
    each sequence's clamped to its last written one) under `mask` [B, 1, L, C] (None: all visible)."""

    members: list[int]
    rows: torch.Tensor
    query_slots: torch.Tensor
    gather: torch.Tensor
    mask: torch.Tensor | None
    width: int  # L
    context: int  # C


def group(chunks: list[Chunk], members: list[int], offsets: np.ndarray, block_size: int,
          device: torch.device) -> Group:
    picked = [chunks[i] for i in members]
    width = max(c.length for c in picked)
    context = max(c.end for c in picked)
    rows, query_slots, gathers, masks = [], [], [], []
    for b, c in enumerate(picked):
        end = c.end
        rows.append(np.arange(c.length) + offsets[members[b]])
        query_slots.append(b * width + np.arange(c.length))
        keys = np.minimum(np.arange(context), end - 1)  # only written slots are read
        table = np.asarray(c.block_ids, dtype=np.int64)
        gathers.append(table[keys // block_size] * block_size + keys % block_size)
        queries = c.start + np.arange(width)  # query i sits at start + i (padding rows see key 0 only)
        visible = np.arange(context)[None, :] <= np.where(np.arange(width) < c.length, queries, 0)[:, None]
        masks.append(visible)
    mask = np.stack(masks)[:, None]
    as_tensor = lambda a: torch.from_numpy(np.concatenate(a)).to(device)  # noqa: E731
    return Group(members, as_tensor(rows), as_tensor(query_slots), as_tensor(gathers),
                 None if mask.all() else torch.from_numpy(mask).to(device), width, context)


class PagedAttention:
    def __init__(self, cache: PagedKVCache, chunks: list[Chunk], device: torch.device, kernel: bool = False):
        self.cache, self.chunks = cache, chunks
        bs = cache.block_size
        self.positions = torch.from_numpy(
            np.concatenate([np.arange(c.start, c.end) for c in chunks])).to(device)
        self.slots = torch.from_numpy(slot_mapping(chunks, bs)).to(device)
        self.lengths = [c.length for c in chunks]
        self.kernel = None
        if kernel:  # one launch for the step: block tables, query offsets and contexts on the device
            width = max(-(-c.end // bs) for c in chunks)
            self.kernel = (torch.from_numpy(padded_block_table([c.block_ids for c in chunks], width)).to(device),
                           torch.from_numpy(np.concatenate(([0], np.cumsum(self.lengths)))).to(device),
                           torch.tensor([c.end for c in chunks], device=device),
                           max(self.lengths))
            self.groups, self.alone = [], []
            return
        offsets = np.concatenate(([0], np.cumsum(self.lengths)[:-1]))
        decodes = [i for i, c in enumerate(chunks) if c.length == 1]
        prompts = [i for i, c in enumerate(chunks) if c.length > 1]
        kinds = [decodes] + ([prompts] if device.type == "cpu" else [[i] for i in prompts])
        self.groups, self.alone = [], []
        for members in filter(None, kinds):
            gathered = len(members) * max(chunks[i].end for i in members)
            if len(members) > 1 and gathered > MAX_GATHER_TOKENS:
                self.alone += members
            else:
                self.groups.append(group(chunks, members, offsets, bs, device))
        self._offsets = offsets

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.layer(layer)
        k_cache.index_copy_(0, self.slots, k)
        v_cache.index_copy_(0, self.slots, v)
        if self.kernel is not None:
            tables, query_starts, contexts, longest = self.kernel
            return triton_prefill.paged_varlen_attention(q, self.cache.k[layer], self.cache.v[layer], tables,
                                                         query_starts, contexts, max_query_len=longest)
        if len(self.groups) == 1 and not self.alone and len(self.groups[0].members) == len(self.chunks):
            return self._attend_group(layer, q, self.groups[0])  # one kind of row: no scatter needed
        out = torch.empty_like(q)
        for g in self.groups:
            out.index_copy_(0, g.rows, self._attend_group(layer, q.index_select(0, g.rows), g))
        for i in self.alone:
            rows = slice(int(self._offsets[i]), int(self._offsets[i]) + self.lengths[i])
            out[rows] = self._attend_one(layer, q[rows], self.chunks[i])
        return out

    def _attend_group(self, layer: int, q: torch.Tensor, g: Group) -> torch.Tensor:
        """q [T_g, Hq, D] of the group's rows (in order) -> [T_g, Hq, D]."""
        batch, heads, dim = len(g.members), q.shape[1], q.shape[2]
        k_cache, v_cache = self.cache.layer(layer)
        kv_heads = k_cache.shape[1]
        keys, values = (t.index_select(0, g.gather).view(batch, g.context, kv_heads, dim).transpose(1, 2)
                        for t in (k_cache, v_cache))  # [B, Hkv, C, D]
        if g.width == 1:  # decode rows: grouped heads folded into the query length, keys never repeated
            out = F.scaled_dot_product_attention(q.view(batch, kv_heads, heads // kv_heads, dim), keys, values,
                                                 attn_mask=g.mask)
            return out.reshape(batch, heads, dim)
        padded = q.new_zeros(batch * g.width, heads, dim).index_copy_(0, g.query_slots, q)
        padded = padded.view(batch, g.width, heads, dim).transpose(1, 2)  # [B, Hq, L, D]
        out = F.scaled_dot_product_attention(padded, keys, values, attn_mask=g.mask, enable_gqa=heads != kv_heads)
        return out.transpose(1, 2).reshape(batch * g.width, heads, dim).index_select(0, g.query_slots)

    def _attend_one(self, layer: int, q: torch.Tensor, c: Chunk) -> torch.Tensor:
        """One sequence's chunk against its own keys: bottom-right causal, no mask, nothing padded."""
        slots = slot_mapping([Chunk(0, c.end, c.block_ids)], self.cache.block_size)
        slots = torch.from_numpy(slots).to(q.device)
        k_cache, v_cache = self.cache.layer(layer)
        return sdpa(q, k_cache.index_select(0, slots), v_cache.index_select(0, slots), causal=True)

    def attend_each(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same attention, one call per sequence (the reference the batched calls must match)."""
        k_cache, v_cache = self.cache.layer(layer)
        k_cache.index_copy_(0, self.slots, k)
        v_cache.index_copy_(0, self.slots, v)
        return torch.cat([self._attend_one(layer, qs, c) for qs, c in zip(q.split(self.lengths), self.chunks)])


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
