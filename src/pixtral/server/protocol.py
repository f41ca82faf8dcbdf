"""The OpenAI chat-completions protocol: the request model, and the shapes of what we send back.

Requests are validated with pydantic (unknown fields are ignored, as OpenAI-compatible servers
commonly do); features we do not implement are refused with a 400 naming the parameter rather
than silently ignored. Responses are plain dicts in OpenAI's shapes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from pixtral.engine.outputs import OutputDelta, RequestOutput, TokenLogprob
from pixtral.generation.params import SamplingParams
from pixtral.server.errors import APIError


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Any]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    def unsupported(self) -> None:
        """Refuse what we would otherwise silently get wrong."""
        if self.n not in (None, 1):
            raise APIError(400, f"'n' = {self.n} is not supported: only one choice per request",
                           code="unsupported", param="n")
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise APIError(400, f"'{param}' is not supported (send 0 or leave it out)", code="unsupported", param=param)
        if self.logit_bias:
            raise APIError(400, "'logit_bias' is not supported", code="unsupported", param="logit_bias")
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise APIError(400, "tool and function calling are not supported", code="unsupported", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format {self.response_format.get('type')!r} is not supported",
                           code="unsupported", param="response_format")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise APIError(400, f"'top_logprobs' must be an integer from 0 to 20, got {self.top_logprobs}",
                           code="invalid_request", param="top_logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", code="invalid_request", param="top_logprobs")

    def sampling_params(self) -> SamplingParams:
        """As engine parameters (SamplingParams checks the values and raises RequestError)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            max_tokens=max_tokens,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )


def count_images(messages: list[Any]) -> int:
    """Image parts in the messages, counted before any is decoded."""
    n = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            n += sum(1 for part in content if isinstance(part, dict) and part.get("type") in ("image_url", "image"))
    return n


# ---------------------------------------------------------------------- responses
class ResponseMeta:
    """The id, creation time and model name shared by every chunk of one response."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model


def usage(out: OutputDelta | RequestOutput) -> dict[str, Any]:
    prompt = out.num_prompt_tokens
    completion = out.num_generated_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens, "image_tokens": out.num_image_tokens},
    }


def logprobs_content(processor, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = processor.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]


def completion_response(meta: ResponseMeta, out: RequestOutput, processor) -> dict[str, Any]:
    choice = out.outputs[0]
    logprobs = None
    if choice.logprobs is not None:
        logprobs = {"content": logprobs_content(processor, choice.logprobs)}
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
        }],
        "usage": usage(out),
    }


def chunk(meta: ResponseMeta, delta: dict[str, Any], finish_reason: str | None = None,
          logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(meta: ResponseMeta, out: OutputDelta) -> dict[str, Any]:
    return {
        "id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
        "choices": [], "usage": usage(out),
    }


def model_card(name: str, max_model_len: int | None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "pixtral"}
    if max_model_len:
        card["max_model_len"] = max_model_len
    return card


