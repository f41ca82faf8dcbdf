"""Vision-encoder outputs kept by image content hash, so a repeated image is encoded once.

Least recently used entries are dropped past the capacity (counted in image tokens). Callers
hold their own references to what they use in a step, so eviction never pulls features out
from under a running step.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, capacity_tokens: int):
        self.capacity = capacity_tokens
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.size = 0
        self.hits = 0
        self.misses = 0

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
        while self.size > self.capacity and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.size -= old.shape[0]

    def clear(self) -> None:
        self.entries.clear()
        self.size = 0
