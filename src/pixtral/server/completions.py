"""OpenAI's legacy completions API (`POST /v1/completions`): raw text prompts, no chat template.

What text tools need, lm-evaluation-harness's `local-completions` model among them: a prompt is a
string, a list of strings, token ids or a list of them, tokenized raw (BOS added, as for any
completion). `echo` puts the prompt before the answer, and with `logprobs` the prompt tokens'
logprobs too (the first token has none): `echo=True, max_tokens=0, logprobs=N` scores a text
without generating (a loglikelihood request). Logprobs are in the legacy shape: `tokens`,
`token_logprobs`, `top_logprobs` (token -> logprob, the chosen token included) and `text_offset`
(where each token starts in the choice's `text`).

Each prompt is one engine request with `n` sequences; choice `i` of prompt `p` has index
`p * n + i`, as OpenAI numbers them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pixtral.engine.async_engine import RequestStream
from pixtral.engine.outputs import OutputDelta, RequestOutput, TokenLogprob
from pixtral.engine.request import Prompt
from pixtral.errors import ContextLengthError, PixtralError
from pixtral.generation.params import SamplingParams
from pixtral.server.errors import APIError, error_body, from_pixtral_error
from pixtral.server.protocol import SamplingRequest

MAX_PROMPTS = 256  # prompts in one request: each is an engine request
MAX_LOGPROBS = 5  # as OpenAI's legacy API


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> None:
        if self.suffix:
            raise APIError(400, "'suffix' is not supported (no insertion: text continues the prompt)",
                           code="unsupported", param="suffix")
        if self.best_of is not None and self.best_of not in (1, self.n or 1):
            raise APIError(400, f"'best_of' = {self.best_of} is not supported: only best_of equal to n "
                                "(every sequence sampled is returned)", code="unsupported", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS}, got {self.logprobs}",
                           code="invalid_request", param="logprobs")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "'max_tokens' = 0 needs 'echo': true (to return the prompt, scored with logprobs)",
                           code="invalid_request", param="max_tokens")
        if self.max_tokens == 0 and self.min_tokens:
            raise APIError(400, f"'min_tokens' ({self.min_tokens}) must not exceed 'max_tokens' (0)",
                           code="invalid_request", param="min_tokens")

    @property
    def scores_only(self) -> bool:
        """max_tokens 0: the prompt is run for its logprobs and nothing generated (one token is
        sampled from the prompt's last logits, which costs no extra forward pass, and dropped)."""
        return self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """The prompts as strings or token-id lists."""
        prompt = self.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not prompts:
            raise APIError(400, "'prompt' is empty", code="invalid_request", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"'prompt' holds {len(prompts)} prompts, over the limit of {MAX_PROMPTS}",
                           code="invalid_request", param="prompt")
        return prompts

    def sampling_params(self) -> SamplingParams:
        wants = self.logprobs is not None
        return SamplingParams(max_tokens=1 if self.scores_only else self.max_tokens,
                              logprobs=self.logprobs if wants else None,
                              prompt_logprobs=self.logprobs if wants and self.echo else None,
                              **self.sampling_kwargs())


def encode_prompt(processor, prompt: str | list[int], max_model_len: int) -> Prompt:
    """A raw prompt -> engine prompt: text tokenized with BOS first (a text that cannot fit is refused
    before it is tokenized: a character is at least one byte, a token at most `max_token_bytes`)."""
    if isinstance(prompt, list):
        return Prompt(list(prompt)).with_hashes()
    if len(prompt) > max_model_len * processor.max_token_bytes:
        raise ContextLengthError(f"the prompt holds {len(prompt)} characters, more than the {max_model_len} "
                                 "tokens of the context can hold")
    return Prompt([processor.bos_id] + processor.encode_text(prompt)).with_hashes()


class ChoiceText:
    """One choice's text and legacy logprobs, built as its deltas come (streamed or not)."""

    def __init__(self, processor, req: CompletionRequest, prompt: str | list[int], prompt_ids: list[int]):
        self.processor, self.req = processor, req
        self.prompt_text = prompt if isinstance(prompt, str) else processor.decode(prompt)
        self.prompt_ids = prompt_ids
        self.offset = 0  # characters of text sent so far
        self.started = False

    def piece(self, delta: OutputDelta, prompt_logprobs: list[TokenLogprob | None] | None
              ) -> tuple[str, dict[str, Any] | None]:
        """The text and logprobs a delta adds (the echoed prompt first, with the first delta)."""
        text, tokens, logprobs = "", [], []
        if self.req.echo and not self.started:
            text = self.prompt_text
            tokens = list(self.prompt_ids)
            logprobs = list(prompt_logprobs) if prompt_logprobs is not None else [None] * len(tokens)
        self.started = True
        if not self.req.scores_only:
            text += delta.text
            tokens += delta.token_ids
            logprobs += delta.logprobs or [None] * len(delta.token_ids)
        legacy = self._legacy(tokens, logprobs) if self.req.logprobs is not None else None
        self.offset += len(text)
        return text, legacy

    def _legacy(self, tokens: list[int], logprobs: list[TokenLogprob | None]) -> dict[str, Any]:
        names = [self._name(t) for t in tokens]
        offsets, at = [], self.offset
        for name in names:
            offsets.append(at)
            at += len(name)
        top = []
        for name, lp in zip(names, logprobs):
            if lp is None:
                top.append(None)
                continue
            entry = {self._name(t): v for t, v in lp.top}
            entry.setdefault(name, lp.logprob)  # the chosen token is always there, as vLLM
            top.append(entry)
        return {"tokens": names, "token_logprobs": [lp.logprob if lp is not None else None for lp in logprobs],
                "top_logprobs": top, "text_offset": offsets}

    def _name(self, token: int) -> str:
        return self.processor.token_bytes(token).decode("utf-8", errors="replace")


def usage_of(outputs: list[RequestOutput], scores_only: bool) -> dict[str, Any]:
    """OpenAI's usage over every prompt: each prompt counted once, the tokens of every choice."""
    prompt = sum(o.num_prompt_tokens for o in outputs)
    completion = 0 if scores_only else sum(o.num_generated_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}


def finish_reason(req: CompletionRequest, reason: str | None) -> str | None:
    return "length" if req.scores_only and reason is not None else reason


def response(meta, req: CompletionRequest, prompts: list[str | list[int]], outputs: list[RequestOutput],
             processor) -> dict[str, Any]:
    choices = []
    for p, (prompt, out) in enumerate(zip(prompts, outputs)):
        for choice in out.outputs:
            builder = ChoiceText(processor, req, prompt, out.prompt_token_ids)
            delta = OutputDelta(out.request_id, text=choice.text, token_ids=choice.token_ids,
                                logprobs=choice.logprobs)
            text, logprobs = builder.piece(delta, out.prompt_logprobs)
            choices.append({"index": p * len(out.outputs) + choice.index, "text": text, "logprobs": logprobs,
                            "finish_reason": finish_reason(req, choice.finish_reason)})
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage_of(outputs, req.scores_only)}


def chunk(meta, index: int, text: str, logprobs: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, OutputDelta]]:
    """The deltas of several streams as they come, with the number of the stream each is from. Ending
    early (an error, a client gone) aborts every stream."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


async def sse(streams: list[RequestStream], meta, req: CompletionRequest, prompts: list[str | list[int]],
              processor, metrics) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams completions: text pieces per choice, each choice's finish
    reason, [usage of every prompt], [DONE]."""
    from pixtral.server.app import event  # the server's SSE encoder (app.py imports this module)

    n = streams[0].params.n
    builders = {(p, i): ChoiceText(processor, req, prompt, s.prompt.token_ids)
                for p, (prompt, s) in enumerate(zip(prompts, streams)) for i in range(n)}
    totals = [RequestOutput.start(s.request_id, s.prompt.token_ids, False, n) for s in streams]
    try:
        async for p, delta in merged(streams):
            total = totals[p]
            total.add(delta)
            if total.finished:
                metrics.observe_finished(total)
            if delta.error:
                status = 400 if delta.error_code == "invalid_request" else 500
                yield event(error_body(status, delta.error, code=delta.error_code or "internal_error"))
                break
            text, logprobs = builders[p, delta.index].piece(delta, total.prompt_logprobs)
            reason = finish_reason(req, delta.finish_reason)
            if text or logprobs or reason:
                yield event(chunk(meta, p * n + delta.index, text, logprobs, reason))
        else:
            if req.stream_options and req.stream_options.include_usage:
                yield event({"id": meta.id, "object": "text_completion", "created": meta.created,
                             "model": meta.model, "choices": [], "usage": usage_of(totals, req.scores_only)})
        yield "data: [DONE]\n\n"
    except PixtralError as exc:  # the engine stopped under us
        yield event(from_pixtral_error(exc).body())
        yield "data: [DONE]\n\n"
