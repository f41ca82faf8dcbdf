"""Our OpenAI-format processor gives mistral-common's exact ids and pixels on random chats.

The reference builds mistral-common's own request objects from the same images; ours starts from
OpenAI-style dicts whose images arrive as files, file:// URLs, data: URIs or PIL objects.
"""

from __future__ import annotations

import base64
import io
import random

import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from pixtral.processing import load_processor

N_CHATS = 320
WORDS = ["the", "image", "Describe", "what", "is", "chart", "value", "naïve", "汉字", "🙂", "1024", "x", "\n", "  ", "?"]
MODES = ["RGB", "RGBA", "L", "P", "LA", "CMYK"]


def random_size(rng: random.Random) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.15:
        return rng.randint(1, 20), rng.randint(1, 20)
    if kind < 0.3:  # extreme aspect ratios, over 1024 on the long side
        long, short = rng.randint(1025, 4000), rng.randint(1, 80)
        return (long, short) if rng.random() < 0.5 else (short, long)
    if kind < 0.45:  # both sides over 1024 (downscaled, round-half-even matters)
        return rng.randint(1025, 1400), rng.randint(1025, 1400)
    return rng.randint(20, 900), rng.randint(20, 900)


def random_image(rng: random.Random) -> tuple[Image.Image, bytes]:
    w, h = random_size(rng)
    mode = rng.choice(MODES)
    pixels = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGBA")
    img = img.convert(mode) if mode != "P" else img.convert("RGB").quantize(colors=rng.randint(2, 64))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else "PNG", compress_level=1)
    data = buf.getvalue()
    return Image.open(io.BytesIO(data)), data


def random_text(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))).strip()
    return text or "hi"


def random_chat(rng: random.Random, tmp_path, index: int):
    ours, ref = [], []
    for _ in range(rng.choice([0, 0, 1, 2])):
        text = random_text(rng)
        ours.append({"role": "system", "content": text})
        ref.append(SystemMessage(content=text))
    turns = rng.randint(1, 3)
    for turn in range(turns):
        if rng.random() < 0.3:
            text = random_text(rng)
            ours.append({"role": "user", "content": text})
            ref.append(UserMessage(content=text))
        else:
            parts, chunks = [], []
            n_parts = rng.randint(1, 4)
            for k in range(n_parts):
                if rng.random() < 0.45:
                    image, data = random_image(rng)
                    how = rng.choice(["path", "file", "data", "pil"])
                    if how == "pil":
                        url = image
                    elif how == "data":
                        url = f"data:image/{image.format.lower()};base64,{base64.b64encode(data).decode()}"
                    else:
                        path = tmp_path / f"img{index}_{turn}_{k}.{image.format.lower()}"
                        path.write_bytes(data)
                        url = str(path) if how == "path" else path.as_uri()
                    parts.append({"type": "image_url", "image_url": {"url": url} if not isinstance(url, Image.Image) else url})
                    chunks.append(ImageChunk(image=image))
                else:
                    text = random_text(rng)
                    parts.append({"type": "text", "text": text})
                    chunks.append(TextChunk(text=text))
            ours.append({"role": "user", "content": parts})
            ref.append(UserMessage(content=chunks))
        if turn < turns - 1:
            text = random_text(rng) + rng.choice(["", "  "])
            ours.append({"role": "assistant", "content": text})
            ref.append(AssistantMessage(content=text))
    return ours, ref


@pytest.fixture(scope="module")
def reference(shipped_tekken):
    return MistralTokenizer.from_file(str(shipped_tekken))


def test_random_chats_match_mistral_common(tmp_path, reference, shipped_tekken):
    processor = load_processor(shipped_tekken)
    rng = random.Random(1234)
    n_images = 0
    for i in range(N_CHATS):
        ours, ref = random_chat(rng, tmp_path, i)
        expected = reference.encode_chat_completion(ChatCompletionRequest(messages=ref))
        ids, images = processor.encode_chat(ours)
        assert ids == expected.tokens, f"chat {i}: token ids differ"
        assert len(images) == len(expected.images)
        for got, want in zip(images, expected.images):
            assert tuple(got.shape) == want.shape
            assert float(np.abs(got.numpy() - want).max(initial=0.0)) <= 1e-5
        n_images += len(images)
    assert n_images > 200  # the sample really exercised images


def test_spec_token_vectors(shipped_tekken):
    p = load_processor(shipped_tekken)
    assert p.encode_chat([{"role": "user", "content": "Hello"}])[0] == [1, 3, 22177, 4]
    ids, _ = p.encode_chat([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there!"}, {"role": "user", "content": "What is 2+2?"},
    ])
    assert ids == [1, 3, 22177, 4, 37133, 2156, 1033, 2, 3, 5934, 13426, 1338, 7493, 1395, 1032, 1050, 1043, 1050, 1063, 4]
    image = Image.new("RGB", (300, 100), "red")
    ids, images = p.encode_chat([{"role": "user", "content": [
        {"type": "text", "text": "Describe the image."}, {"type": "image_url", "image_url": image}]}])
    assert len(ids) == 148 and ids[:2] == [1, 3] and ids[-6:] == [5847, 13089, 1278, 3937, 1046, 4]
    block = ids[2:142]
    assert block.count(10) == 133 and block.count(12) == 6 and block[-1] == 13
    assert tuple(images[0].shape) == (3, 112, 304)
