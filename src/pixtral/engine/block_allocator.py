"""KV-cache blocks by id: reference counts, a free list, and the prefix cache's index.

A block in use has a reference count > 0 (several requests can share a cached prefix block).
A freed block goes on the free list but keeps its contents and, if it was full, its hash: until
it is handed out again, a new request with the same prefix can take it back (a prefix-cache
hit). The free list is in eviction order: blocks that hold nothing reusable go first, then
cached blocks, least recently freed first. Block 0 is never handed out: padded rows of a
static-shape batch write there.
"""

from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0


class BlockAllocator:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.ref_counts[NULL_BLOCK] = 1  # reserved forever

    # ------------------------------------------------------------------ counts
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, cached or not)."""
        return len(self.free)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one request."""
        return self.num_usable - len(self.free)

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash (in use or free)."""
        return len(self.cached)

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free)} free")  # the scheduler checks first
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            old = self.hashes[block]
            if old is not None:  # evict it from the prefix cache
                del self.cached[old]
                self.hashes[block] = None
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds become free."""
        for block in reversed(blocks):  # a sequence's tail is evicted before its head
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.hashes[block] is None:  # nothing to reuse: hand it out first
                    self.free.move_to_end(block, last=False)

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Blocks holding the longest cached prefix of `hashes` (no references taken)."""
        hits = []
        if self.enable_caching:
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                hits.append(block)
        return hits

    def num_free_among(self, blocks: list[int]) -> int:
        return sum(1 for b in blocks if self.ref_counts[b] == 0)

    def share(self, blocks: list[int]) -> None:
        """Take a reference to cached blocks (found by `lookup`)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """Make a full, computed block findable by its hash."""
        if not self.enable_caching or self.hashes[block] is not None or block_hash in self.cached:
            return  # already cached, or the same content is cached in another block
        self.cached[block_hash] = block
        self.hashes[block] = block_hash

    def reset_prefix_cache(self) -> None:
        for block_hash, block in list(self.cached.items()):
            self.hashes[block] = None
        self.cached.clear()
