"""Sampling parameters, named as in vLLM and the OpenAI API."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pixtral.errors import RequestError
from pixtral.structured.grammar import StructuredOutput

# Below this temperature sampling is greedy: logits divided by it would overflow float32 (as vLLM).
GREEDY_TEMPERATURE = 1e-5
MAX_STOP_STRINGS = 64  # each is searched for after every generated token
MAX_STOP_CHARS = 1000
MAX_STOP_TOKEN_IDS = 1024
MAX_N = 16  # choices per request: each is a sequence in the batch
MAX_LOGIT_BIAS = 1024  # entries: each is a scattered write per sampled token
MAX_PENALTY = 2.0  # presence and frequency penalties, as OpenAI and vLLM
MAX_LOGIT_BIAS_VALUE = 100.0


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
    prompt_logprobs: int | None = None  # the same for every prompt token but the first (vLLM)
    n: int = 1  # choices: sequences sampled from the one prompt (its KV blocks shared)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far
    repetition_penalty: float = 1.0  # tokens of the prompt or generated: positive logits divided, negative multiplied
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, before everything else
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the sequence before this many tokens
    structured_output: StructuredOutput | None = None  # a grammar the output must match (JSON schema, tools)

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
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise RequestError(f"'prompt_logprobs' must be an integer from 0 to 20, got {_show(self.prompt_logprobs)}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise RequestError(f"'n' must be an integer from 1 to {MAX_N}, got {_show(self.n)}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _as_float(getattr(self, name))
            if value is None or math.isnan(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise RequestError(f"'{name}' must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], "
                                   f"got {_show(getattr(self, name))}")
        r = _as_float(self.repetition_penalty)
        if r is None or math.isnan(r) or math.isinf(r) or r <= 0:
            raise RequestError(f"'repetition_penalty' must be a finite number > 0, got {_show(self.repetition_penalty)}")
        m = _as_float(self.min_p)
        if m is None or math.isnan(m) or not 0 <= m <= 1:
            raise RequestError(f"'min_p' must be in [0, 1], got {_show(self.min_p)}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise RequestError(f"'min_tokens' must be an integer >= 0, got {_show(self.min_tokens)}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(f"'min_tokens' ({self.min_tokens}) must not exceed 'max_tokens' ({self.max_tokens})")
        self._validate_logit_bias()
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                raise RequestError("'structured_output' must be a StructuredOutput")
            if self.min_tokens:  # the grammar may allow only EOS: every token would be forbidden
                raise RequestError("'min_tokens' cannot be combined with a structured output "
                                   "(response_format, a forced tool call)")

    def _validate_logit_bias(self) -> None:
        """Token ids are checked against the vocabulary by the engine, which knows it."""
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise RequestError("'logit_bias' must map token ids to numbers")
        if len(bias) > MAX_LOGIT_BIAS:
            raise RequestError(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        for token, value in bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise RequestError(f"'logit_bias' keys must be token ids (integers >= 0), got {_show(token)}")
            v = _as_float(value)
            if v is None or math.isnan(v) or not -MAX_LOGIT_BIAS_VALUE <= v <= MAX_LOGIT_BIAS_VALUE:
                raise RequestError(f"'logit_bias' values must be in [-{MAX_LOGIT_BIAS_VALUE:g}, "
                                   f"{MAX_LOGIT_BIAS_VALUE:g}], got {_show(value)} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def processes_logits(self) -> bool:
        """Whether the logits need processing before sampling (see `logits_processors`)."""
        return bool(self.logit_bias or self.min_tokens or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)


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
