"""Penalties, logit_bias and min_tokens by their definitions (OpenAI / vLLM), applied by hand to the
model's own logits: the references the engine and server tests compare with. Shares no code with
`pixtral.generation.logits_processors`."""

from __future__ import annotations

import torch

from pixtral.generation import SamplingParams
from pixtral.generation.kv_cache import KVCache


@torch.inference_mode()
def next_logits(model, ids: list[int], images) -> torch.Tensor:
    """The model's raw logits for the token after `ids` (a plain forward, no engine)."""
    cache = KVCache(model.args, len(ids), model.device, model.dtype)
    features = model.encode_images(images) if images else None
    h = model.embed(torch.tensor(ids, device=model.device), features)
    return model.logits(model.hidden_states(h, cache.step(len(ids)))[-1]).float().cpu()


def by_definition(logits: torch.Tensor, prompt: list[int], generated: list[int], p: SamplingParams,
                  stop_ids: set[int]) -> torch.Tensor:
    """Each parameter as OpenAI / vLLM define it, one token at a time."""
    logits = logits.clone()
    for token, bias in (p.logit_bias or {}).items():
        logits[token] += bias
    if len(generated) < p.min_tokens:
        for token in stop_ids:
            logits[token] = float("-inf")
    for token in set(prompt) | set(generated):
        if p.repetition_penalty != 1.0:
            value = logits[token]
            logits[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token in set(generated):
        logits[token] -= p.frequency_penalty * generated.count(token) + p.presence_penalty
    return logits


def greedy_reference(model, processor, messages, params: SamplingParams) -> list[int]:
    """The greedy answer to a chat under `params`, one plain forward per token."""
    prompt, images = processor.encode_chat(messages)
    return greedy_ids_reference(model, prompt, images, params, processor.eos_id)


def greedy_ids_reference(model, prompt: list[int], images, params: SamplingParams, eos_id: int) -> list[int]:
    """The greedy continuation of a prompt under `params`, one plain forward per token."""
    stop_ids = set(params.stop_token_ids) | {eos_id}
    generated: list[int] = []
    for _ in range(params.max_tokens):
        logits = by_definition(next_logits(model, prompt + generated, images), prompt, generated, params, stop_ids)
        token = int(torch.argmax(logits))
        if token in stop_ids:
            break
        generated.append(token)
    return generated
