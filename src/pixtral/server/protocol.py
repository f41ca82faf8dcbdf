"""The OpenAI chat-completions protocol: the request model, and the shapes of what we send back
(the legacy completions API, `/v1/completions`, is in `completions.py`).

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
from pixtral.generation.params import MAX_LOGIT_BIAS, SamplingParams
from pixtral.server.errors import APIError
from pixtral.server.structured import ChatConstraints, assistant_message
from pixtral.structured import StructuredOutput


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The sampling fields that chat and (legacy) completions requests share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM)
    min_p: float | None = None  # extension (vLLM)
    max_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    min_tokens: int | None = None  # extension (vLLM)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (vLLM)
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias
    user: str | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        """The shared fields as `SamplingParams` arguments (defaults as OpenAI's)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens or 0,
            n=1 if self.n is None else self.n,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=logit_bias_ids(self.logit_bias),
        )


def logit_bias_ids(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as strings) with integer keys; a 400 naming a key that is not one."""
    if bias is None:
        return None
    if len(bias) > MAX_LOGIT_BIAS:  # checked again by SamplingParams; here before converting them all
        raise APIError(400, f"'logit_bias' takes at most {MAX_LOGIT_BIAS} entries, got {len(bias)}",
                       code="invalid_request", param="logit_bias")
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise APIError(400, f"'logit_bias' keys must be token ids (integers >= 0), got {key[:40]!r}",
                           code="invalid_request", param="logit_bias")
        out[int(key)] = value
    return out


class ChatCompletionRequest(SamplingRequest):
    messages: list[Any]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> None:
        """Refuse what we would otherwise silently get wrong."""
        if self.functions:  # tools and response_format: see `pixtral.server.structured`
            raise APIError(400, "'functions' (deprecated by OpenAI) is not supported: use 'tools'",
                           code="unsupported", param="functions")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise APIError(400, f"'top_logprobs' must be an integer from 0 to 20, got {self.top_logprobs}",
                           code="invalid_request", param="top_logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", code="invalid_request", param="top_logprobs")

    def sampling_params(self, structured_output: StructuredOutput | None = None) -> SamplingParams:
        """As engine parameters (SamplingParams checks the values and raises RequestError)."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return SamplingParams(max_tokens=max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                              structured_output=structured_output, **self.sampling_kwargs())


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

    def __init__(self, model: str, prefix: str = "chatcmpl"):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
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


def completion_response(meta: ResponseMeta, out: RequestOutput, processor,
                        constraints: ChatConstraints | None = None) -> dict[str, Any]:
    choices = []
    for choice in out.outputs:
        logprobs = None
        if choice.logprobs is not None:
            logprobs = {"content": logprobs_content(processor, choice.logprobs)}
        message, finish_reason = assistant_message(constraints or ChatConstraints(), choice.token_ids, choice.text,
                                                   choice.finish_reason)
        choices.append({
            "index": choice.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        })
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(out),
    }


def chunk(meta: ResponseMeta, delta: dict[str, Any], finish_reason: str | None = None,
          logprobs: dict[str, Any] | None = None, index: int = 0) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(meta: ResponseMeta, out: OutputDelta | RequestOutput, kind: str = "chat.completion.chunk"
                ) -> dict[str, Any]:
    return {
        "id": meta.id, "object": kind, "created": meta.created, "model": meta.model,
        "choices": [], "usage": usage(out),
    }


def model_card(name: str, max_model_len: int | None, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI's model object, plus (once loaded) max_model_len and what the engine runs: dtype,
    quantization (null when the weights are not quantized) and its source, tensor_parallel_size."""
    card: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "pixtral"}
    if max_model_len:
        card["max_model_len"] = max_model_len
    if info:
        card.update({k: info[k] for k in ("dtype", "quantization", "quantization_source", "tensor_parallel_size")})
    return card


