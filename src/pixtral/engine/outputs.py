"""What the engine hands back: per-step deltas (streaming) and finished results (offline API).

`Engine.step()` returns token-level `OutputDelta`s (no text yet); the `OutputProcessor` adds the
text, applies stop strings and hands them to clients. Names follow vLLM: a `RequestOutput` has
`outputs` (one `CompletionOutput` per choice, `n` of them) with the text, token ids and finish
reason, plus the prompt's token counts. A delta is one choice's: `index` says which, and
`request_id` is the engine's id of that choice (`parent_id`, the client's).
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
    index: int = 0  # the choice
    parent_id: str | None = None  # the client's request id (None: `request_id`)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first delta of a request that asked
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

    @property
    def owner(self) -> str:
        """The client's request id."""
        return self.parent_id or self.request_id

    def extend(self, later: "OutputDelta") -> None:
        """Take in the request's next delta (not an error one): as if both had come in one step."""
        self.text += later.text
        self.token_ids += later.token_ids
        if self.logprobs is not None and later.logprobs is not None:
            self.logprobs += later.logprobs
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
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
    num_generated_tokens: int = 0  # of every choice together (the prompt counts once, as OpenAI's usage)
    finished: bool = False  # every choice finished, or one failed
    error: str | None = None
    error_code: str | None = None
    metrics: RequestMetrics | None = None  # once finished
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked for: one per prompt token, the first None
    _generated: list[int] = field(default_factory=list, repr=False)  # per choice

    @classmethod
    def start(cls, request_id: str, prompt_token_ids: list[int], want_logprobs: bool, n: int = 1) -> "RequestOutput":
        outputs = [CompletionOutput(index=i, logprobs=[] if want_logprobs else None) for i in range(n)]
        return cls(request_id, list(prompt_token_ids), outputs, num_prompt_tokens=len(prompt_token_ids),
                   _generated=[0] * n)

    def add(self, delta: OutputDelta) -> None:
        out = self.outputs[delta.index]
        out.text += delta.text
        out.token_ids += delta.token_ids
        if delta.logprobs and out.logprobs is not None:
            out.logprobs += delta.logprobs
        out.finish_reason = delta.finish_reason
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.num_image_tokens = delta.num_image_tokens
        self.num_cached_tokens = delta.num_cached_tokens
        self._generated[delta.index] = delta.num_generated_tokens
        self.num_generated_tokens = sum(self._generated)
        if delta.error is not None:  # one failed choice fails the request
            self.error, self.error_code = delta.error, delta.error_code
        self.finished = self.error is not None or all(o.finish_reason is not None for o in self.outputs)
        if delta.metrics is not None:
            self.metrics = delta.metrics
