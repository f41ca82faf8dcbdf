"""One step's work on one sequence: the only unit the scheduler hands the layers below it.

A `Chunk` is tokens [start, start + length) of a request, with the block table that holds the
request's keys and values. The scheduler makes one per scheduled request; the model runner
reads the tokens through `request`, and the attention contexts (`PagedAttention`,
`slot_mapping`) and the CUDA-graph decoder read only the positions and the block table, so
they can be exercised without a request (tests, benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pixtral.engine.request import Request


@dataclass
class Chunk:
    start: int  # first token to compute
    length: int  # how many
    block_ids: list[int]  # the sequence's block table: block b holds tokens [b * block_size, (b + 1) * block_size)
    request: Request | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def prompt_logit_positions(self) -> range:
        """Positions of this chunk whose logits give prompt logprobs (each predicts the prompt's next
        token), when its request keeps them; empty otherwise."""
        req = self.request
        if req is None or req.prompt_logprobs is None:
            return range(0)
        return range(self.start, max(self.start, min(self.end, req.prompt_len - 1)))

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of its sequence, so its last logits pick a token."""
        return self.request is not None and self.end == self.request.num_tokens
