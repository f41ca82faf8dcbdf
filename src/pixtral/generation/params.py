"""Sampling parameters, named as in vLLM and the OpenAI API."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pixtral.errors import RequestError

# Below this temperature sampling is greedy: logits divided by it would overflow float32 (as vLLM).
GREEDY_TEMPERATURE = 1e-5
MAX_STOP_STRINGS = 64  # each is searched for after every generated token
MAX_STOP_CHARS = 1000
MAX_STOP_TOKEN_IDS = 1024


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    max_tokens: int | None = None  # None: until EOS or the context is full
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # the text before a stop string is returned
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # return this many top alternatives per generated token

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        t = _as_float(self.temperature)
        if t is None or math.isnan(t) or math.isinf(t) or t < 0:
            raise RequestError(f"'temperature' must be a finite number >= 0, got {_show(self.temperature)}")
        p = _as_float(self.top_p)
        if p is None or math.isnan(p) or not 0 < p <= 1:
            raise RequestError(f"'top_p' must be in (0, 1], got {_show(self.top_p)}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise RequestError(f"'top_k' must be an integer >= -1, got {_show(self.top_k)}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise RequestError(f"'max_tokens' must be a positive integer, got {_show(self.max_tokens)}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise RequestError(f"'seed' must be a 64-bit integer, got {_show(self.seed)}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError("'stop' must be a non-empty string or a list of them")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise RequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                               f"characters each")
        ids = self.stop_token_ids
        if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise RequestError("'stop_token_ids' must be a list of token ids (integers >= 0)")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise RequestError(f"'logprobs' must be an integer from 0 to 20, got {_show(self.logprobs)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _as_float(value) -> float | None:
    """A number as a float (an int past the float range is inf), anything else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def _show(value) -> str:
    """A value for an error message, short (a huge int has too many digits to print)."""
    try:
        text = repr(value)
    except ValueError:
        return "an integer with too many digits"
    return text if len(text) <= 40 else text[:40] + "…"
