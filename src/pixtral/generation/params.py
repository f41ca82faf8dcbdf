"""Sampling parameters, named as in vLLM and the OpenAI API."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pixtral.errors import RequestError


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
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
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or math.isinf(t) or t < 0:
            raise RequestError(f"'temperature' must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p <= 1:
            raise RequestError(f"'top_p' must be in (0, 1], got {p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise RequestError(f"'top_k' must be an integer >= -1, got {self.top_k!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise RequestError(f"'max_tokens' must be a positive integer, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise RequestError(f"'seed' must be a 64-bit integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError("'stop' must be a non-empty string or a list of them")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise RequestError(f"'logprobs' must be an integer from 0 to 20, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
