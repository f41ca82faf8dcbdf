"""Token masks for the constrained rows of a step, computed together and off the engine thread.

`MaskBatch.start` hands every constrained sequence's matcher to llguidance's parallel executor in a
background thread (the work is in Rust, without the GIL), so the masks are computed while the model
runs its forward pass; `apply` then waits for them and sets the logits of forbidden tokens to -inf,
on the logits' device, in the constrained rows only. Unconstrained rows are never touched.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from pixtral.errors import RequestError
from pixtral.structured.grammar import _short

try:  # present whenever a grammar could be compiled (`grammar.MISSING` otherwise)
    import llguidance as llg
    import llguidance.torch as llgt
except ImportError:
    llg = llgt = None


class MaskBatch:
    """The masks of one step: a row of the bitmask per matcher, by key (the engine's request id)."""

    def __init__(self, future: Future | None, rows: dict[str, int], matchers: dict[str, llg.LLMatcher]):
        self._future, self._rows, self._matchers = future, rows, matchers

    def apply(self, logits: torch.Tensor, keys: list[str | None]) -> tuple[torch.Tensor, dict[int, Exception]]:
        """logits [B, V] and each row's key (None: unconstrained) -> (the logits with the constrained rows
        masked, a copy when any is; the errors of rows whose matcher failed: their row is left alone)."""
        rows = [i for i, k in enumerate(keys) if k is not None and k in self._rows]
        if not rows:
            return logits, {}
        bitmask = self._future.result()
        errors = {i: GrammarError(_error(self._matchers[keys[i]])) for i in rows if self._matchers[keys[i]].is_error()}
        rows = [i for i in rows if i not in errors]
        if not rows:
            return logits, errors
        allowed = unpack(bitmask[[self._rows[keys[i]] for i in rows]].to(logits.device, non_blocking=True),
                         logits.shape[-1])
        masked = logits.clone()
        masked[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return masked, errors


class GrammarError(RequestError):
    """A sequence's matcher failed: a limit hit while computing a mask (the request's grammar is too costly),
    or a token it could not take."""


class Masker:
    """Starts each step's mask computation (one background thread; llguidance's executor parallelizes it)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size  # the tokenizer's: the width of a matcher's mask
        self._executor = llg.LLExecutor()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pixtral-grammar")

    def start(self, matchers: dict[str, llg.LLMatcher]) -> MaskBatch:
        """Begin computing the next-token mask of each matcher (by key)."""
        if not matchers:
            return MaskBatch(None, {}, {})
        rows = {key: i for i, key in enumerate(matchers)}
        bitmask = llgt.allocate_token_bitmask(len(matchers), self.vocab_size)
        pairs = [(m, rows[key]) for key, m in matchers.items()]
        future = self._thread.submit(self._fill, pairs, bitmask)
        return MaskBatch(future, rows, matchers)

    def _fill(self, pairs: list[tuple[llg.LLMatcher, int]], bitmask: torch.Tensor) -> torch.Tensor:
        llgt.fill_next_token_bitmask_par(self._executor, pairs, bitmask)
        return bitmask

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def unpack(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """int32 bitmask [R, ceil(V/32)] (bit j of word w: token 32w + j) -> bool [R, width]; tokens past the
    mask's vocabulary (a model vocabulary wider than the tokenizer's) are not allowed."""
    if bitmask.device.type == "cpu":  # numpy's unpackbits: 8x faster than the shifts (little-endian words)
        allowed = torch.from_numpy(np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little"))
        allowed = allowed.view(torch.bool)
    else:
        allowed = unpack_on_device(bitmask)
    if allowed.shape[1] >= width:
        return allowed[:, :width]
    pad = torch.zeros(bitmask.shape[0], width - allowed.shape[1], dtype=torch.bool, device=bitmask.device)
    return torch.cat([allowed, pad], dim=1)


def unpack_on_device(bitmask: torch.Tensor) -> torch.Tensor:
    """`unpack` with tensor ops, where the bitmask is (on an accelerator: 1 bit per token crosses the bus)."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    return ((bitmask[:, :, None] >> bits) & 1).bool().reshape(bitmask.shape[0], -1)


def advance(matcher: llg.LLMatcher, token: int) -> bool:
    """Feed a sampled token to its sequence's matcher -> whether the grammar is complete (nothing may
    follow). Raises GrammarError when the matcher cannot take it."""
    if not matcher.consume_token(token):
        raise GrammarError(_error(matcher))
    return matcher.is_stopped()


def _error(matcher: llg.LLMatcher) -> str:
    return "structured output failed: " + _short(matcher.get_error(), 300)
