"""A contiguous KV cache for one sequence: the simple path (CLI, reference generation).

The serving engine has its own paged cache; both plug into the model as attention contexts.
"""

from __future__ import annotations

import torch

from pixtral.model.args import ModelArgs
from pixtral.model.attention import sdpa


class KVCache:
    """Grows by doubling up to `max_len`, so a long context limit costs memory only when used."""

    def __init__(self, args: ModelArgs, max_len: int, device: torch.device, dtype: torch.dtype,
                 initial: int = 256):
        self.max_len = max_len
        self.length = 0
        capacity = min(max_len, initial)
        shape = (args.n_layers, capacity, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def step(self, n_tokens: int) -> "CacheStep":
        needed = self.length + n_tokens
        if needed > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot add {n_tokens} to {self.length}")
        if needed > self.k.shape[1]:
            capacity = min(self.max_len, max(needed, 2 * self.k.shape[1]))
            grow = capacity - self.k.shape[1]
            pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], grow, *t.shape[2:])], dim=1)
            self.k, self.v = pad(self.k), pad(self.v)
        return CacheStep(self, self.length, n_tokens)


class CacheStep:
    """Attention context for appending n tokens: writes their k/v, attends causally to all so far."""

    def __init__(self, cache: KVCache, start: int, n: int):
        self.cache, self.start, self.n = cache, start, n
        self.positions = torch.arange(start, start + n, device=cache.k.device)

    def attend(self, layer: int, q, k, v):
        c, s, e = self.cache, self.start, self.start + self.n
        c.k[layer, s:e] = k
        c.v[layer, s:e] = v
        if layer == c.k.shape[0] - 1:
            c.length = e
        keys, values = c.k[layer, :e], c.v[layer, :e]
        # The new tokens are the last n of the e keys: token i sees keys up to position s + i.
        return sdpa(q, keys, values, causal=True)
