"""Pack whole samples into sequences of at most `seq_len` tokens, in a seeded order per epoch.

Sequence k of the (endless) stream is always the same list of samples for a given seed,
so the data position of a run is just the number of sequences it has consumed.
"""

from __future__ import annotations

import random


def pack(lengths: list[int], order: list[int], seq_len: int) -> list[list[int]]:
    """Greedy, in order: start a new sequence when the next sample does not fit."""
    seqs, current, used = [], [], 0
    for i in order:
        n = lengths[i]
        if current and used + n > seq_len:
            seqs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        seqs.append(current)
    return seqs


class PackedStream:
    """Endless stream of packed sequences (lists of sample indices), epoch after epoch."""

    def __init__(self, lengths: list[int], seq_len: int, seed: int, shuffle: bool = True):
        self.lengths, self.seq_len, self.seed, self.shuffle = lengths, seq_len, seed, shuffle
        self._epochs: list[list[list[int]]] = []

    def _epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            order = list(range(len(self.lengths)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + len(self._epochs)).shuffle(order)
            self._epochs.append(pack(self.lengths, order, self.seq_len))
        return self._epochs[e]

    def sequences_per_epoch(self) -> int:
        return len(self._epoch(0))

    def __getitem__(self, k: int) -> list[int]:
        e = 0
        while k >= len(self._epoch(e)):
            k -= len(self._epoch(e))
            e += 1
        return self._epoch(e)[k]
