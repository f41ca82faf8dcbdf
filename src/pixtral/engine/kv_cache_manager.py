"""Which KV blocks hold each request's tokens: the layer between the scheduler and the block allocator.

The scheduler decides how many tokens of which requests run in a step; this manager finds
the cached prefix a request can start from, grows its block table to hold the tokens
scheduled, offers full computed blocks to the prefix cache, and gives the blocks back when a
request is preempted or ends. It keeps, per request id, the block table and the chained hashes
of the request's full blocks (`prefix_cache.hash_block`), so a `Request` knows tokens and not
blocks, and the `BlockAllocator` below knows blocks and not requests.
"""

from __future__ import annotations

from collections.abc import Sequence

from pixtral.engine.block_allocator import BlockAllocator
from pixtral.engine.prefix_cache import hash_block
from pixtral.engine.request import Request


class KVCacheManager:
    def __init__(self, allocator: BlockAllocator, block_size: int):
        self.allocator, self.block_size = allocator, block_size
        self.enable_caching = allocator.enable_caching
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # kept over a preemption: the tokens stay the same
        self._registered: dict[str, int] = {}  # leading blocks of the table already offered to the prefix cache

    # ------------------------------------------------------------------ counts
    @property
    def num_blocks(self) -> int:
        """Blocks requests can hold (the allocator's reserved one left out)."""
        return self.allocator.num_usable

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used

    @property
    def num_cached_blocks(self) -> int:
        return self.allocator.num_cached

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks, in token order (empty while it holds none). Grows in place."""
        return self._tables.get(request_id, [])

    # ------------------------------------------------------------------ prefix cache
    def block_hashes(self, request: Request) -> list[bytes]:
        """Chained hashes of every full block of the request's tokens so far (the manager's list, extended as
        tokens come: read it, do not change it)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        for b in range(len(hashes), request.num_tokens // bs):
            start, end = b * bs, (b + 1) * bs
            images = request.images_for_rows(*request.image_rows(start, end))
            hashes.append(hash_block(hashes[-1] if hashes else None, request.token_ids[start:end],
                                     [request.image_hashes[k] for k in images]))
        return hashes

    def computed_prefix(self, request: Request) -> tuple[list[int], int]:
        """The cached blocks the request can start from -> (those blocks, the tokens they hold).

        At least one token is left to compute, since its logits pick the next token. No reference is
        taken: pass the blocks to `allocate`, which takes them only if the rest fits. A request that
        asks for prompt logprobs computes its whole prompt: a cached block holds keys and values, not logits.
        """
        if not self.enable_caching or request.prompt_logprobs is not None:
            return [], 0
        hits = self.allocator.lookup(self.block_hashes(request)[: (request.num_tokens - 1) // self.block_size])
        return hits, len(hits) * self.block_size

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """The first `num_computed_tokens` are in the cache: make its full blocks findable by later requests."""
        rid = request.request_id
        full, done = num_computed_tokens // self.block_size, self._registered.get(rid, 0)
        if not self.enable_caching or full <= done:
            return
        hashes, table = self.block_hashes(request), self._tables[rid]
        for b in range(done, full):
            self.allocator.register(table[b], hashes[b])
        self._registered[rid] = full

    # ------------------------------------------------------------------ blocks
    def allocate(self, request: Request, num_tokens: int, hits: Sequence[int] = (), reserve: int = 0) -> bool:
        """Grow the request's block table to hold its first `num_tokens` tokens.

        `hits` (from `computed_prefix`) start a new table. False, with nothing changed, if this would
        leave fewer than `reserve` blocks free (the scheduler keeps some for running decodes).
        """
        rid = request.request_id
        table = self._tables.get(rid, [])
        if hits and table:
            raise ValueError(f"request {rid} already holds blocks; prefix-cache hits start a new table")
        need = max(0, -(-num_tokens // self.block_size) - len(table) - len(hits))
        if need == 0 and not hits:
            return True
        if need > self.allocator.num_free - self.allocator.num_free_among(hits) - reserve:
            return False
        self.allocator.share(hits)
        if rid not in self._tables:
            self._tables[rid] = table
            self._registered[rid] = len(hits)  # found by their hashes, so already registered
        table += [*hits, *self.allocator.allocate(need)]  # in place: this step's chunk holds the list
        return True

    def fork(self, parent: Request, child: Request, num_tokens: int, reserve: int = 0) -> list[tuple[int, int]] | None:
        """Give `child` the parent's first `num_tokens` tokens (its prompt, computed): the full blocks shared,
        the partly filled last one as a copy of its own (the two sequences write different tokens after it).

        -> the (source, destination) block copy to make before the child's next step ([] if none), or
        None, with nothing changed, if the copy would leave fewer than `reserve` blocks free.
        """
        full, partial = divmod(num_tokens, self.block_size)
        table = self._tables[parent.request_id]
        if partial and self.allocator.num_free - reserve < 1:
            return None
        shared = table[:full]
        self.allocator.share(shared)
        copies = []
        if partial:
            block = self.allocator.allocate(1)[0]
            copies.append((table[full], block))
            shared = shared + [block]
        self._tables[child.request_id] = shared
        self._registered[child.request_id] = min(full, self._registered.get(parent.request_id, 0))
        return copies

    def free(self, request: Request) -> None:
        """Give back the request's blocks (a preemption, or its end); full ones stay in the prefix cache."""
        self.allocator.release(self._tables.pop(request.request_id, []))
        self._registered.pop(request.request_id, None)

    def free_block_hashes(self, request: Request) -> None:
        """Forget the request's hashes once it has ended (a preempted request keeps them for its return)."""
        self._hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        self.allocator.reset_prefix_cache()
