"""What the engine hands back: per-step deltas (streaming) and finished results (offline API).

`Engine.step()` returns token-level `OutputDelta`s (no text yet); the `OutputProcessor` adds the
text, applies stop strings and hands them to clients. Names follow vLLM: a `RequestOutput` has
`outputs[0]` (a `CompletionOutput`) with the text, token ids and finish reason, plus the
prompt's token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class RequestMetrics:
    """When things happened to a request, in `time.monotonic()` seconds (as vLLM's `RequestMetrics`)."""

    arrival_time: float  # the engine took the request
    first_scheduled_time: float | None = None  # first admitted to a step
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class OutputDelta:
    """What one request gained in one engine step. The last one has `finished` set."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None  # with finish_reason "error": what went wrong
    error_code: str | None = None  # "invalid_request" (the request's fault) or "internal_error"
    num_prompt_tokens: int = 0
    num_image_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generated_tokens: int = 0  # so far, including a stop token that is not returned
    # Times. A client gets them on its last delta; the engine's token-level deltas carry them on
    # every one (the request's own record), so that the output processor can end a request.
    metrics: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, later: "OutputDelta") -> None:
        """Take in the request's next delta (not an error one): as if both had come in one step."""
        self.text += later.text
        self.token_ids += later.token_ids
        if self.logprobs is not None and later.logprobs is not None:
            self.logprobs += later.logprobs
        for name in ("finish_reason", "num_prompt_tokens", "num_image_tokens", "num_cached_tokens",
                     "num_generated_tokens", "metrics"):
            setattr(self, name, getattr(later, name))


@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_prompt_tokens: int = 0
    num_image_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0
    finished: bool = False
    error: str | None = None
    error_code: str | None = None
    metrics: RequestMetrics | None = None  # once finished

    @classmethod
    def start(cls, request_id: str, prompt_token_ids: list[int], want_logprobs: bool) -> "RequestOutput":
        completion = CompletionOutput(logprobs=[] if want_logprobs else None)
        return cls(request_id, list(prompt_token_ids), [completion], num_prompt_tokens=len(prompt_token_ids))

    def add(self, delta: OutputDelta) -> None:
        out = self.outputs[0]
        out.text += delta.text
        out.token_ids += delta.token_ids
        if delta.logprobs and out.logprobs is not None:
            out.logprobs += delta.logprobs
        out.finish_reason = delta.finish_reason
        self.num_image_tokens = delta.num_image_tokens
        self.num_cached_tokens = delta.num_cached_tokens
        self.num_generated_tokens = delta.num_generated_tokens
        self.finished = delta.finished
        self.error = delta.error
        self.error_code = delta.error_code
        if delta.metrics is not None:
            self.metrics = delta.metrics
