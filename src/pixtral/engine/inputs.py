"""What users send, turned into engine prompts: chats, plain text, or token ids with images."""

from __future__ import annotations

from typing import Any

import torch

from pixtral.engine.request import Prompt
from pixtral.errors import RequestError
from pixtral.processing.images import ImagePolicy


def chat_prompt(processor, messages: list[dict[str, Any]], policy: ImagePolicy | None = None) -> Prompt:
    """OpenAI-format messages -> prompt (images loaded under `policy`, decoded and hashed)."""
    ids, images = processor.encode_chat(messages, policy)
    return Prompt(ids, images).with_hashes()


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
