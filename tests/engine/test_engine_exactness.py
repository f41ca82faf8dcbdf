"""The engine gives the reference loop's greedy tokens, however requests are batched, chunked,
cached or preempted (fp32, CPU)."""

from __future__ import annotations

import pytest
from tiny_model import MAX_SEQ_LEN, image_uri, user

from pixtral.engine import LLM
from pixtral.errors import ContextLengthError
from pixtral.generation import SamplingParams, chat

GREEDY = SamplingParams(temperature=0, max_tokens=10)


def conversations(n: int) -> list[list[dict]]:
    convs = []
    for i in range(n):
        images = [image_uri(i % 5, (60 + 8 * (i % 4), 50 + 6 * (i % 3))) for _ in range(i % 3)]
        convs.append([user(f"Describe picture {i}. " * (1 + i % 4), *images)])
    return convs


@pytest.fixture(scope="module")
def references(model, processor):
    return [chat(model, processor, conv, GREEDY) for conv in conversations(17)]


def check(outputs, references):
    for out, ref in zip(outputs, references, strict=True):
        got = out.outputs[0]
        assert got.token_ids == ref.token_ids
        assert got.text == ref.text
        assert got.finish_reason == ref.finish_reason
        assert out.num_prompt_tokens == ref.prompt_tokens
        assert out.num_image_tokens == ref.image_tokens


def test_alone_and_among_16_others(model, processor, references):
    llm = LLM.from_model(model, processor, num_blocks=256)
    convs = conversations(17)
    check([llm.chat(convs[i], GREEDY)[0] for i in (0, 7, 16)], [references[i] for i in (0, 7, 16)])
    llm.engine.reset_prefix_cache()
    check(llm.chat(convs, GREEDY), references)
    assert llm.engine.stats().kv_blocks_used == 0


def test_chunked_prefill(model, processor, references):
    # 17 sequences need at least 17 tokens a step; prompts of up to ~150 tokens take several chunks,
    # and an image's tokens are split between chunks.
    llm = LLM.from_model(model, processor, num_blocks=256, max_num_batched_tokens=40, max_num_seqs=17,
                         enable_prefix_caching=False)
    check(llm.chat(conversations(17), GREEDY), references)


def test_prefix_cache_reuses_blocks_and_stays_exact(model, processor):
    llm = LLM.from_model(model, processor, num_blocks=256)
    long_text = "Here is a long shared system prompt about charts and tables. " * 6
    a, b = image_uri(1), image_uri(2)
    conv_a = [{"role": "system", "content": long_text}, user("What is in the picture?", a)]
    conv_b = [{"role": "system", "content": long_text}, user("What is in the picture?", b)]
    first = llm.chat(conv_a, GREEDY)[0]
    assert first.num_cached_tokens == 0
    again = llm.chat(conv_a, GREEDY)[0]
    assert again.num_cached_tokens >= first.num_prompt_tokens - 16  # all full blocks but the last token's
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    other = llm.chat(conv_b, GREEDY)[0]  # same tokens, different pixels: only the text before the image hits
    ids = processor.encode_chat(conv_b)[0]
    first_image_block = ids.index(model.image_token_id) // 16
    assert other.num_cached_tokens == first_image_block * 16
    assert other.outputs[0].token_ids == chat(model, processor, conv_b, GREEDY).token_ids
    stats = llm.engine.stats()
    assert stats.encoder_cache_hits_total >= 1  # conv_a's image was encoded once
    assert stats.images_encoded_total == 2
    assert stats.kv_blocks_used == 0


def test_preemption_recomputes_exactly(model, processor, references):
    # 40 blocks of 16 tokens cannot hold 17 sequences of ~60-160 tokens: requests are preempted.
    llm = LLM.from_model(model, processor, num_blocks=40, enable_prefix_caching=False)
    check(llm.chat(conversations(17), GREEDY), references)
    stats = llm.engine.stats()
    assert stats.preemptions_total > 0
    assert stats.kv_blocks_used == 0


def test_multi_turn_with_30_images(model, processor):
    images = [image_uri(100 + i, (20 + i, 18 + i)) for i in range(30)]
    conv = [
        user("Here are the first pictures.", *images[:10]),
        {"role": "assistant", "content": "I see ten pictures."},
        user("And twenty more: which is the brightest?", *images[10:]),
    ]
    llm = LLM.from_model(model, processor, num_blocks=256, max_num_batched_tokens=64)
    out = llm.chat(conv, GREEDY)[0]
    ref = chat(model, processor, conv, GREEDY)
    assert out.outputs[0].token_ids == ref.token_ids
    assert llm.engine.stats().images_encoded_total == 30


def test_full_context_length_and_beyond(model, processor):
    llm = LLM.from_model(model, processor, num_blocks=2 * MAX_SEQ_LEN // 16 + 1)
    ids = [1] + [1000 + i % 500 for i in range(MAX_SEQ_LEN - 10)]  # 1015 tokens: 9 left
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 9 and out.outputs[0].finish_reason == "length"
    unbounded = llm.generate(ids, SamplingParams(temperature=0, ignore_eos=True))[0]
    assert len(unbounded.outputs[0].token_ids) == 9  # max_tokens=None: until the context is full
    with pytest.raises(ContextLengthError, match="context length is 1024"):
        llm.generate(ids, SamplingParams(temperature=0, max_tokens=10))
    with pytest.raises(ContextLengthError, match="1024"):
        llm.generate(ids + [5] * 9, SamplingParams(temperature=0, max_tokens=1))
    assert llm.engine.stats().kv_blocks_used == 0


def test_kv_capacity_below_context_is_a_clear_error(model, processor):
    llm = LLM.from_model(model, processor, num_blocks=5)  # 4 usable blocks = 64 tokens
    with pytest.raises(ContextLengthError, match="KV cache holds only"):
        llm.generate([1] + [1000] * 70, SamplingParams(max_tokens=1))
