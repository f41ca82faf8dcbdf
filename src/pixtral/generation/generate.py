"""The simple generation loop: one conversation, a contiguous KV cache, text streamed out.

The serving engine batches many requests; this loop is the plain reference it must match.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pixtral.errors import ContextLengthError
from pixtral.generation.kv_cache import KVCache
from pixtral.generation.logits_processors import RowState, process_logits
from pixtral.generation.params import SamplingParams
from pixtral.generation.sampling import make_generator, sample, stop_token_ids
from pixtral.generation.stop import StopStringMatcher


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string/id) or "length"
    prompt_tokens: int = 0
    image_tokens: int = 0


def max_new_tokens(prompt_len: int, params: SamplingParams, limit: int,
                   what: str | None = None) -> int:
    """How many tokens may follow a prompt under a context `limit`; a clear error if none may.

    `what` says where the limit comes from (default: the model's context length).
    """
    what = what or f"the model's context length is {limit}"
    if prompt_len >= limit:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens, but {what}")
    budget = limit - prompt_len
    if params.max_tokens is not None and params.max_tokens > budget:
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens and max_tokens is {params.max_tokens}: "
            f"{prompt_len + params.max_tokens} tokens, but {what}"
        )
    return params.max_tokens or budget


@torch.inference_mode()
def generate_ids(model, ids: list[int], images: list[torch.Tensor], params: SamplingParams,
                 eos_id: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token, logits) for each generated token; EOS is yielded too, then the loop ends."""
    device = model.device
    max_new = max_new_tokens(len(ids), params, model.args.max_seq_len)
    cache = KVCache(model.args, len(ids) + max_new, device, model.dtype,
                    initial=len(ids) + min(max_new, 256))
    generator = make_generator(params.seed)
    stop_ids = stop_token_ids(params, eos_id)
    features = model.encode_images(images) if images else None
    h = model.embed(torch.tensor(ids, device=device), features)
    logits = model.logits(model.hidden_states(h, cache.step(len(ids)))[-1])
    sequence = list(ids)  # the prompt, then the generated tokens (what penalties count)
    for i in range(max_new):
        row = logits.cpu()
        if params.processes_logits:
            row = process_logits(row[None], [RowState(params, sequence, len(ids), stop_ids)])[0]
        token = sample(row, params, generator)
        yield token, logits
        if token in stop_ids or i == max_new - 1:
            return
        sequence.append(token)
        # A generated token is plain text to the model, even if it happens to be [IMG].
        h = model.tok_embeddings(torch.tensor([token], device=device))
        logits = model.logits(model.hidden_states(h, cache.step(1))[-1])


def stream_chat(model, processor, messages: list[dict], params: SamplingParams | None = None
                ) -> Iterator[str | Completion]:
    """Yield text pieces as they are produced, then the finished `Completion` last."""
    params = params or SamplingParams()
    ids, images = processor.encode_chat(messages)
    image_token_ids = set((processor.image_token_ids or {}).values())
    result = Completion(prompt_tokens=len(ids), image_tokens=sum(t in image_token_ids for t in ids))
    decoder, stops = processor.stream_decoder(), StopStringMatcher(params.stop)
    stop_ids = stop_token_ids(params, processor.eos_id)
    for token, _ in generate_ids(model, ids, images, params, processor.eos_id):
        if token in stop_ids:
            result.finish_reason = "stop"
            break
        result.token_ids.append(token)
        piece = stops.push(decoder.push(token))
        if piece:
            result.text += piece
            yield piece
        if stops.stopped:
            result.finish_reason = "stop"
            break
    else:
        result.finish_reason = "length"
    tail = stops.push(decoder.flush()) + stops.flush()
    if tail:
        result.text += tail
        yield tail
    yield result


def chat(model, processor, messages: list[dict], params: SamplingParams | None = None) -> Completion:
    *_, result = stream_chat(model, processor, messages, params)
    return result
