"""What users send, turned into engine prompts: chats, plain text, or token ids with images."""

from __future__ import annotations

from typing import Any

import torch

from pixtral.engine.request import Prompt
from pixtral.errors import ContextLengthError, RequestError
from pixtral.processing.images import ImagePolicy


def chat_prompt(processor, messages: list[dict[str, Any]], policy: ImagePolicy | None = None,
                max_tokens: int | None = None, tools: list | None = None) -> Prompt:
    """OpenAI-format messages -> prompt (images loaded under `policy`, decoded and hashed; `tools`:
    mistral-common `Tool`s, in the prompt as the tokenizer version defines).

    With `max_tokens` (the context), a text that cannot fit is refused before anything is
    tokenized or decoded (`check_text_length`).
    """
    if max_tokens is not None:
        check_text_length(messages, max_tokens, processor.max_token_bytes)
    ids, images = processor.encode_chat(messages, policy, tools)
    return Prompt(ids, images).with_hashes()


def text_chars(messages: Any) -> int:
    """Characters of text in OpenAI-format messages (string contents and text parts), counted
    without looking at anything else."""
    n = 0
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, list):
            n += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return n


def check_text_length(messages: Any, max_tokens: int, max_token_bytes: int) -> None:
    """Refuse messages whose text alone is surely longer than `max_tokens` tokens, before tokenizing it.

    A character is at least one byte of UTF-8 and a token at most `max_token_bytes` bytes, so a
    text of n characters is at least n / max_token_bytes tokens: the bound never refuses a text
    that fits, and costs a length count instead of a tokenization (minutes for a 100 MB body).
    """
    chars = text_chars(messages)
    if chars > max_tokens * max_token_bytes:
        raise ContextLengthError(
            f"the messages hold {chars} characters of text, at least {-(-chars // max_token_bytes)} tokens "
            f"(a token spans at most {max_token_bytes} bytes), but the context holds {max_tokens} tokens")


def generate_prompt(processor, prompt: Any) -> Prompt:
    """A prompt for `LLM.generate`: a string (BOS is added), a list of token ids, a `Prompt`, or a
    dict with 'prompt' (text) or 'prompt_token_ids', and optionally 'images' (preprocessed
    [3, H, W] tensors, one per run of [IMG] tokens, as `Processor.encode_document` returns).
    """
    if isinstance(prompt, Prompt):
        return prompt.with_hashes()
    if isinstance(prompt, str):
        return Prompt([processor.bos_id] + processor.encode_text(prompt)).with_hashes()
    if isinstance(prompt, (list, tuple)):
        return Prompt(list(prompt)).with_hashes()
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
        elif isinstance(prompt.get("prompt"), str):
            ids = [processor.bos_id] + processor.encode_text(prompt["prompt"])
        else:
            raise RequestError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
        images = list(prompt.get("images") or [])
        if not all(isinstance(img, torch.Tensor) for img in images):
            raise RequestError("'images' must be preprocessed image tensors [3, H, W] (use LLM.chat for image files)")
        return Prompt(ids, images).with_hashes()
    raise RequestError(f"a prompt must be a string, token ids or a dict, got {type(prompt).__name__}")
