"""`/v1/completions` through the official openai client: text, echo, logprobs, loglikelihood, streaming."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from live_server import MODEL_NAME, metrics, wait_idle

from pixtral.generation import SamplingParams
from pixtral.generation.generate import generate_ids
from pixtral.generation.kv_cache import KVCache

TEXT = "The quick brown fox jumps over the lazy dog, and then"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def encode(processor, text: str) -> list[int]:
    return [processor.bos_id] + processor.encode_text(text)


def greedy_ids(model, processor, ids: list[int], max_tokens: int) -> list[int]:
    out = []
    for token, _ in generate_ids(model, ids, [], SamplingParams(temperature=0, max_tokens=max_tokens),
                                 processor.eos_id):
        if token == processor.eos_id:
            break
        out.append(token)
    return out


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's own logits over the prompt: row p scores token p + 1."""
    cache = KVCache(model.args, len(ids), model.device, model.dtype)
    h = model.embed(torch.tensor(ids, device=model.device), None)
    return torch.log_softmax(model.logits(model.hidden_states(h, cache.step(len(ids)))).float(), dim=-1).cpu()


def name(processor, token: int) -> str:
    return processor.token_bytes(token).decode("utf-8", errors="replace")


def test_text_completion_is_the_model_greedy_continuation(client, model, processor):
    ids = encode(processor, TEXT)
    expected = greedy_ids(model, processor, ids, 8)
    resp = client.completions.create(model=MODEL_NAME, prompt=TEXT, max_tokens=8, temperature=0)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].text == processor.decode(expected) and resp.choices[0].index == 0
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 8
    # Token ids work as prompts too, and the default max_tokens is OpenAI's 16.
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, temperature=0)
    assert by_ids.choices[0].text == processor.decode(greedy_ids(model, processor, ids, 16))
    assert by_ids.usage.completion_tokens == 16


def test_logprobs_of_generated_tokens_in_the_legacy_shape(client, model, processor):
    ids = encode(processor, TEXT)
    resp = client.completions.create(model=MODEL_NAME, prompt=TEXT, max_tokens=4, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    expected = greedy_ids(model, processor, ids, 4)
    assert lp.tokens == [name(processor, t) for t in expected]
    full = prompt_logprobs(model, ids + expected)
    for j, token in enumerate(expected):
        row = full[len(ids) - 1 + j]
        assert lp.token_logprobs[j] == pytest.approx(float(row[token]), abs=1e-4)
        top = torch.topk(row, 3)
        assert set(lp.top_logprobs[j]) >= {name(processor, int(t)) for t in top.indices}
    text = resp.choices[0].text
    assert lp.text_offset == [len("".join(lp.tokens[:j])) for j in range(len(lp.tokens))]
    assert "".join(lp.tokens) == text


def test_echo_with_max_tokens_0_gives_the_prompt_loglikelihood(client, model, processor):
    """What lm-evaluation-harness's loglikelihood requests send (token ids, echo, logprobs)."""
    ids = encode(processor, TEXT)
    reference = prompt_logprobs(model, ids)
    resp = client.completions.create(model=MODEL_NAME, prompt=[ids], max_tokens=0, echo=True, logprobs=1,
                                     temperature=0)
    choice = resp.choices[0]
    assert choice.text == processor.decode(ids) and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.tokens == [name(processor, t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(float(reference[p - 1, ids[p]]), abs=1e-4)
        best = int(reference[p - 1].argmax())
        assert lp.top_logprobs[p][name(processor, best)] == pytest.approx(float(reference[p - 1, best]), abs=1e-4)
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 0
    # With max_tokens 1 (lm-eval's own request), the prompt's logprobs come first, then the token's.
    one = client.completions.create(model=MODEL_NAME, prompt=[ids], max_tokens=1, echo=True, logprobs=1,
                                    temperature=0).choices[0].logprobs
    assert one.token_logprobs[:len(ids)] == lp.token_logprobs and len(one.token_logprobs) == len(ids) + 1


def test_prompt_logprobs_survive_prefix_cache_hits_and_chunked_prefill(client, model, processor):
    """The same long prompt twice (the second finds it cached): its logprobs are computed both times."""
    ids = encode(processor, TEXT * 6)
    reference = prompt_logprobs(model, ids)
    expected = [None] + [float(reference[p - 1, ids[p]]) for p in range(1, len(ids))]
    for _ in range(2):
        got = client.completions.create(model=MODEL_NAME, prompt=[ids], max_tokens=0, echo=True, logprobs=0,
                                        temperature=0).choices[0].logprobs.token_logprobs
        assert got[0] is None and got[1:] == pytest.approx(expected[1:], abs=1e-4)


def test_echo_without_logprobs_and_a_list_of_prompts(client, model, processor):
    prompts = [TEXT, "Once upon a time", "1, 2, 3,"]
    resp = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=3, temperature=0, echo=True)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, resp.choices):
        ids = encode(processor, prompt)
        assert choice.text == prompt + processor.decode(greedy_ids(model, processor, ids, 3))
        assert choice.logprobs is None
    assert resp.usage.prompt_tokens == sum(len(encode(processor, p)) for p in prompts)
    assert resp.usage.completion_tokens == 9


def test_streaming_matches_the_whole_answer(client):
    kwargs = dict(model=MODEL_NAME, prompt=[TEXT, "Once upon a time"], max_tokens=6, temperature=0, logprobs=2,
                  echo=True)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert sum((c.logprobs.tokens for c in mine if c.logprobs), []) == choice.logprobs.tokens
        assert sum((c.logprobs.text_offset for c in mine if c.logprobs), []) == choice.logprobs.text_offset
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12


def test_n_choices_with_a_seed_compute_the_prompt_once(client, server):
    computed = 'pixtral_prompt_tokens_by_source_total{source="local_compute"}'
    kwargs = dict(model=MODEL_NAME, prompt="Quagga fields, n test: " + TEXT, max_tokens=8, temperature=1.0, seed=9,
                  n=3)
    before = metrics(server.url)[computed]
    a = client.completions.create(**kwargs)
    assert metrics(server.url)[computed] - before == a.usage.prompt_tokens  # a new prompt, run once for 3 choices
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert [c.text for c in client.completions.create(**kwargs).choices] == texts
    assert a.usage.completion_tokens == 24
    wait_idle(server.url)


@pytest.mark.parametrize("kwargs, param", [
    (dict(suffix="the end"), "suffix"),
    (dict(best_of=3), "best_of"),
    (dict(logprobs=6), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=0, echo=True, extra_body={"min_tokens": 1}), "min_tokens"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[[1, 2], [131072]]), "prompt"),
    (dict(prompt=["x"] * 257), "prompt"),
    (dict(prompt="word " * 20000), "prompt"),
])
def test_bad_requests_name_the_field(client, kwargs, param):
    kwargs = {"model": MODEL_NAME, "prompt": TEXT, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kwargs)
    assert err.value.body["param"] == param, err.value.body


def test_accepted_edges(client):
    for kwargs in (dict(logprobs=5), dict(logprobs=0), dict(best_of=2, n=2), dict(best_of=1)):
        resp = client.completions.create(model=MODEL_NAME, prompt=TEXT, max_tokens=2, **kwargs)
        assert len(resp.choices) == kwargs.get("n", 1)
        if "logprobs" in kwargs:
            assert all(math.isfinite(v) for v in resp.choices[0].logprobs.token_logprobs)
