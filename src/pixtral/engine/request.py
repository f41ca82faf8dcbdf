"""One request's state while the engine works on it.

A request is a token sequence (prompt, then the tokens generated so far) of which the first
`num_computed_tokens` have keys and values in the KV cache. Each step the scheduler picks how
many of the remaining tokens to compute: all but the last few of a prompt (a prefill chunk),
or the single newest token (a decode). Prefill and decode are the same operation, so
preemption (drop the blocks, recompute later) needs no special case.

A request knows tokens, not blocks: its block table and block hashes are the
`KVCacheManager`'s. Its outputs are tokens: text and stop strings are the `OutputProcessor`'s.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pixtral.engine.outputs import OutputDelta, RequestMetrics, TokenLogprob
from pixtral.engine.prefix_cache import hash_image
from pixtral.generation.params import SamplingParams
from pixtral.generation.sampling import make_generator


@dataclass
class Prompt:
    """Token ids, with the preprocessed images whose [IMG] tokens they contain (in order)."""

    token_ids: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    image_hashes: list[bytes] | None = None  # content hashes; computed when missing

    def with_hashes(self) -> "Prompt":
        if self.image_hashes is None:
            self.image_hashes = [hash_image(img) for img in self.images]
        return self


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def child_ids(request_id: str, n: int) -> list[str]:
    """The engine's ids of a request's n choices (the request's own id when there is one, as vLLM)."""
    return [request_id] if n == 1 else [f"{i}_{request_id}" for i in range(n)]


def child_seed(seed: int, index: int) -> int:
    """Choice `index`'s seed: the request's own for the first, then distinct, reproducible ones."""
    return seed if index == 0 else (seed + index * 0x9E3779B97F4A7C15) % 2**64  # golden-ratio step: well spread


class Request:
    def __init__(self, request_id: str, prompt: Prompt, params: SamplingParams, *, max_new_tokens: int,
                 image_token_id: int | None, image_token_counts: list[int], stop_ids: set[int],
                 image_related_ids: set[int] = frozenset(), parent_id: str | None = None, index: int = 0,
                 matcher=None):
        prompt.with_hashes()
        self.request_id = request_id
        self.parent_id = parent_id or request_id  # the id the client knows
        self.index = index  # which choice this is, of the parent's n
        self.params = params
        self.prompt_len = len(prompt.token_ids)
        self.token_ids: list[int] = list(prompt.token_ids)  # prompt, then generated tokens
        self.images = prompt.images
        self.image_hashes = prompt.image_hashes
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.metrics = RequestMetrics(time.monotonic())  # the scheduler sets first_scheduled_time

        # Where image features go: img_cum[p] = number of [IMG] tokens before prompt position p,
        # so a chunk [a, b) takes feature rows img_cum[a]:img_cum[b] of this request's images.
        ids = np.asarray(prompt.token_ids, dtype=np.int64)
        is_img = ids == image_token_id if image_token_id is not None else np.zeros(len(ids), dtype=bool)
        self.img_cum = np.concatenate(([0], np.cumsum(is_img)))
        self.image_row_starts = np.concatenate(([0], np.cumsum(image_token_counts, dtype=np.int64)))
        # Usage counts every token that stands for an image: [IMG], and [IMG_BREAK] / [IMG_END].
        related = np.asarray(sorted(set(image_related_ids) | ({image_token_id} - {None})), dtype=np.int64)
        self.num_image_tokens = int(np.isin(ids, related).sum())

        # Scheduling state.
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache (first admission)
        self.num_preemptions = 0

        # Output state.
        self.num_generated = 0  # tokens sampled, including a stop token that is not returned
        self.generator = (make_generator(child_seed(params.seed, index))
                          if params.seed is not None and not params.greedy else None)
        self.finish_reason: str | None = None
        self.matcher = matcher  # llguidance's state of the output's grammar (None: unconstrained)
        # Logprob of each prompt token (the first has none), filled as the prompt's chunks run; by the first
        # choice only (the others share its prompt).
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] * self.prompt_len if params.prompt_logprobs is not None and index == 0 else None)

    # ------------------------------------------------------------------ sizes
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens not yet in the KV cache."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    # ------------------------------------------------------------------ images
    def image_rows(self, start: int, end: int) -> tuple[int, int]:
        """Feature rows (over this request's images, concatenated) for tokens [start, end)."""
        cap = self.prompt_len
        return int(self.img_cum[min(start, cap)]), int(self.img_cum[min(end, cap)])

    def images_for_rows(self, r0: int, r1: int) -> list[int]:
        """Indices of the images that own any of the feature rows [r0, r1)."""
        if r1 <= r0:
            return []
        starts = self.image_row_starts
        first = int(np.searchsorted(starts, r0, side="right")) - 1
        last = int(np.searchsorted(starts, r1, side="left")) - 1
        return list(range(first, last + 1))

    def image_slot_mask(self, start: int, end: int) -> np.ndarray:
        """True where token i of [start, end) is a prompt [IMG] slot that takes a feature row."""
        mask = np.zeros(end - start, dtype=bool)
        cap = min(end, self.prompt_len)
        if cap > start:
            mask[: cap - start] = np.diff(self.img_cum[start: cap + 1]) > 0
        return mask

    # ------------------------------------------------------------------ outputs
    def append_token(self, token: int, logprob: TokenLogprob | None, complete: bool = False) -> OutputDelta:
        """Take a sampled token: stop ids, max_tokens and a completed grammar (`complete`) decide whether
        we are done (stop strings are matched on the text, by the output processor)."""
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.monotonic()
        self.num_generated += 1
        delta = OutputDelta(self.request_id, logprobs=[] if self.params.logprobs is not None else None)
        if self.num_generated == 1:  # the prompt is done: its logprobs go out once, with the first token
            delta.prompt_logprobs = self.prompt_logprobs
        if token in self.stop_ids:
            self.finish_reason = "stop"  # the stop token itself is not returned
        else:
            self.token_ids.append(token)
            delta.token_ids.append(token)
            if delta.logprobs is not None and logprob is not None:
                delta.logprobs.append(logprob)
            if complete:  # nothing may follow: the answer is whole
                self.finish_reason = "stop"
            elif self.num_generated >= self.max_new_tokens:
                self.finish_reason = "length"
        return self.fill(delta)

    def fill(self, delta: OutputDelta) -> OutputDelta:
        """Counts, finish reason and times so far (the request's own record: copy it to change it)."""
        delta.finish_reason = self.finish_reason
        delta.parent_id, delta.index = self.parent_id, self.index
        delta.num_prompt_tokens = self.prompt_len
        delta.num_image_tokens = self.num_image_tokens
        delta.num_cached_tokens = self.num_cached_tokens or 0
        delta.num_generated_tokens = self.num_generated
        if self.finish_reason is not None and self.metrics.finished_time is None:
            self.metrics.finished_time = time.monotonic()
        delta.metrics = self.metrics
        return delta
