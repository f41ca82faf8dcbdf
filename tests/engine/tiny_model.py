"""A tiny random Pixtral (real tokenizer and image geometry, toy widths) for the engine and server tests."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pixtral.checkpoint import load_model, save_model
from pixtral.model import Pixtral
from pixtral.model.args import ModelArgs, VisionArgs
from pixtral.processing import load_processor
from pixtral.processing.loading import write_tokenizer_for

MAX_SEQ_LEN = 1024


def tiny_args() -> ModelArgs:
    # image_size 128: images are at most 8x8 patches, so prompts stay short.
    return ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=131072,
                     rope_theta=1e6, max_seq_len=MAX_SEQ_LEN,
                     vision=VisionArgs(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=128))


def build_checkpoint(path, seed: int = 0):
    args = tiny_args()
    torch.manual_seed(seed)
    model = Pixtral(args)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:  # larger than the usual 0.02, so that outputs depend strongly on the context
            torch.nn.init.normal_(p, std=0.1)
    tok = write_tokenizer_for(args, path.parent / f"{path.name}-tekken.json")
    return save_model(model, path, layout="mistral", tokenizer_file=tok)


def image_uri(seed: int, size: tuple[int, int] = (100, 80)) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *images: str) -> dict:
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


# Session fixtures over that model; the engine and server conftests import them.
@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="session")
def model(tiny_dir):
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and immune to busy neighbours
    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def processor(tiny_dir):
    return load_processor(tiny_dir)


class EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: `replay` runs the step eagerly."""

    def __init__(self, fn):
        self.replay = fn


def assert_chats_match_reference(llm, model, processor, max_tokens: int) -> None:
    """Five greedy chats (some with an image, prompts of different lengths) through the engine
    give the tokens of the plain generation loop."""
    from pixtral.generation import SamplingParams, chat

    convs = [[user(f"Question {i}?" + " more" * (i * 7), *([image_uri(i)] if i % 2 else []))] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for conv, out in zip(convs, llm.chat(convs, params)):
        assert out.outputs[0].token_ids == chat(model, processor, conv, params).token_ids
