"""Vision-encoder outputs kept by image content hash, so a repeated image is encoded once.

Least recently used entries are dropped past the capacity (counted in image tokens). Callers
hold their own references to what they use in a step, so eviction never pulls features out
from under a running step.

With `track_evictions` (a tensor-parallel engine), the keys it drops are remembered until
`take_evicted` hands them over: the driver tells its workers to drop the same keys, so that
every rank's copy of the cache holds the same images (see `engine/executor.py`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, capacity_tokens: int, track_evictions: bool = False):
        self.capacity = capacity_tokens
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.size = 0
        self.hits = 0
        self.misses = 0
        self.evicted: dict[bytes, None] | None = {} if track_evictions else None  # ordered set

    def get(self, key: bytes) -> torch.Tensor | None:
        features = self.entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return features

    def put(self, key: bytes, features: torch.Tensor) -> None:
        if key in self.entries:
            return
        self.entries[key] = features
        self.size += features.shape[0]
        if self.evicted is not None:
            self.evicted.pop(key, None)  # dropped before, held again: no longer one to drop
        while self.size > self.capacity and len(self.entries) > 1:
            old_key, old = self.entries.popitem(last=False)
            self.size -= old.shape[0]
            if self.evicted is not None:
                self.evicted[old_key] = None

    def clear(self) -> None:
        if self.evicted is not None:
            self.evicted.update(dict.fromkeys(self.entries))
        self.entries.clear()
        self.size = 0

    def take_evicted(self, keep: list[bytes] = ()) -> list[bytes]:
        """The keys dropped since the last call (tracking only), except those in `keep`."""
        if not self.evicted:
            return []
        keep = set(keep)
        out = [k for k in self.evicted if k not in keep]
        self.evicted.clear()
        return out
