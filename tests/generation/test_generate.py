"""The reference generation loop: cache correctness, sampling, stopping, streaming."""

from __future__ import annotations

import pytest
import torch

from pixtral.errors import ContextLengthError, RequestError
from pixtral.generation import SamplingParams, chat, generate_ids, stream_chat
from pixtral.generation.kv_cache import KVCache
from pixtral.generation.sampling import filtered_probs
from pixtral.generation.stop import StopStringMatcher
from pixtral.processing import load_processor
from tests.conftest import random_model

MESSAGES = [{"role": "user", "content": "Describe the image."}]


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", std=0.1)


@pytest.fixture(scope="module")
def processor(shipped_tekken):
    return load_processor(shipped_tekken)


def test_greedy_with_cache_equals_full_recompute(model, processor):
    ids, images = processor.encode_chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": __import__("PIL.Image").Image.new("RGB", (40, 20), "blue")},
        {"type": "text", "text": "What colour?"}]}])
    result = list(generate_ids(model, ids, images, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), 2))
    seq = list(ids)
    for token, _ in result:
        expected = int(model(torch.tensor(seq), images)[-1].argmax())
        assert token == expected
        seq.append(token)
    assert len(result) == 12


def test_chunked_prefill_equals_one_chunk(model):
    ids = torch.tensor([1, 3, 500, 600, 700, 800, 900, 4])
    h = model.embed(ids)
    one = KVCache(model.args, 16, torch.device("cpu"), torch.float32)
    full = model.hidden_states(h, one.step(8))
    two = KVCache(model.args, 16, torch.device("cpu"), torch.float32, initial=2)  # forces growth too
    first = model.hidden_states(h[:3], two.step(3))
    second = model.hidden_states(h[3:], two.step(5))
    assert torch.allclose(torch.cat([first, second]), full, atol=1e-5)


def test_seeded_sampling_is_reproducible(model, processor):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=7, ignore_eos=True)
    a, b = chat(model, processor, MESSAGES, p), chat(model, processor, MESSAGES, p)
    assert a.token_ids == b.token_ids
    other = chat(model, processor, MESSAGES, SamplingParams(temperature=1.0, max_tokens=10, seed=8, ignore_eos=True))
    assert other.token_ids != a.token_ids


def test_top_k_one_is_greedy(model, processor):
    greedy = chat(model, processor, MESSAGES, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    top1 = chat(model, processor, MESSAGES, SamplingParams(temperature=2.0, top_k=1, max_tokens=8, seed=1, ignore_eos=True))
    assert greedy.token_ids == top1.token_ids


def test_top_p_keeps_the_nucleus():
    probs = filtered_probs(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), SamplingParams(top_p=0.75))
    assert torch.allclose(probs, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0, 0]))


def test_max_tokens_and_stop_ids(model, processor):
    greedy = chat(model, processor, MESSAGES, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert len(greedy.token_ids) == 6 and greedy.finish_reason == "length"
    stopped = chat(model, processor, MESSAGES, SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[greedy.token_ids[3]]))
    assert stopped.token_ids == greedy.token_ids[:3] and stopped.finish_reason == "stop"


def test_stop_strings_and_streaming(model, processor):
    full = chat(model, processor, MESSAGES, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    pieces = list(stream_chat(model, processor, MESSAGES, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
    assert "".join(p for p in pieces if isinstance(p, str)) == full.text == processor.decode(full.token_ids)
    stop = full.text[5:8]
    cut = chat(model, processor, MESSAGES, SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True))
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"


def test_stop_string_matcher_across_pieces():
    m = StopStringMatcher(["END"])
    out = m.push("abc E") + m.push("N") + m.push("Dxyz")
    assert out == "abc " and m.stopped


def test_context_limit_is_a_clear_error(model, processor):
    with pytest.raises(ContextLengthError, match="but the model's context length is 131072"):
        chat(model, processor, MESSAGES, SamplingParams(max_tokens=131072))


@pytest.mark.parametrize("bad", [
    dict(temperature=float("nan")), dict(temperature=-1), dict(top_p=0), dict(max_tokens=-5), dict(top_k=-3),
    dict(logprobs=99), dict(stop=[""]),
])
def test_bad_sampling_params(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def test_stream_decoder_handles_split_utf8(processor):
    ids = processor.encode_text("汉字 🙂 naïve")
    d = processor.stream_decoder()
    assert "".join(d.push(t) for t in ids) + d.flush() == "汉字 🙂 naïve"


def test_generated_img_token_is_plain_text(model, processor):
    """If the model emits [IMG] (id 10), the next step embeds it as text instead of failing."""
    biased = random_model("tiny", std=0.1)
    bias = torch.zeros(biased.args.vocab_size)
    bias[10] = 1e4  # make [IMG] the greedy choice at every step
    plain_logits = biased.logits
    biased.logits = lambda hidden: plain_logits(hidden) + bias
    result = chat(biased, processor, MESSAGES, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert result.token_ids[0] == 10 and len(result.token_ids) == 3


def test_seed_range_is_checked():
    with pytest.raises(RequestError, match="64-bit integer"):
        SamplingParams(seed=2**70)
