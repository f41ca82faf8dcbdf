"""Chat completions with n > 1, penalties, logit_bias, min_p and min_tokens through the official openai client,
and a 400 naming the field just outside every range (and acceptance at its edges)."""

from __future__ import annotations

import openai
import pytest
from live_server import MODEL_NAME, metrics, wait_idle
from penalty_reference import greedy_reference
from tiny_model import user

from pixtral.generation import SamplingParams

MESSAGES = [user("Write a few words about rivers.")]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def create(client, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **kwargs)


def test_n_choices_with_a_seed_are_reproducible_and_streamed_with_their_index(client, server):
    kwargs = dict(temperature=1.0, seed=123, n=3, max_tokens=8)
    computed = 'pixtral_prompt_tokens_by_source_total{source="local_compute"}'
    before = metrics(server.url)[computed]
    fresh = [user("Quokka: a prompt nobody sent before, for n = 3.")]
    a = client.chat.completions.create(model=MODEL_NAME, messages=fresh, **kwargs)
    assert metrics(server.url)[computed] - before == a.usage.prompt_tokens  # the prompt ran once
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(texts)) == 3
    b = client.chat.completions.create(model=MODEL_NAME, messages=fresh, **kwargs)
    assert [c.message.content for c in b.choices] == texts
    assert a.usage.completion_tokens == 3 * 8  # every choice's tokens (and the prompt's once)

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=fresh, **kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    for i, text in enumerate(texts):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == text
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
    assert chunks[-1].usage.prompt_tokens == a.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens


def test_a_client_that_leaves_aborts_every_choice(client, server):
    aborted = 'pixtral_request_success_total{finished_reason="abort"}'
    before = wait_idle(server.url)[aborted]
    stream = create(client, n=4, max_tokens=900, temperature=1.0, stream=True)
    next(iter(stream))
    stream.close()
    after = wait_idle(server.url)
    assert after[aborted] - before == 4 and after["pixtral_kv_blocks_used"] == 0


def test_greedy_n_gives_identical_choices(client):
    resp = create(client, temperature=0, n=2, max_tokens=6)
    assert resp.choices[0].message.content == resp.choices[1].message.content


EOS = "eos"  # stands for the tokenizer's EOS id in a logit_bias below

PENALIZED = {
    # name: (request fields, whether the answer differs from the plain greedy one)
    "presence (negative)": (dict(presence_penalty=-2.0), True),
    "frequency (negative)": (dict(frequency_penalty=-1.0), True),
    # = the plain answer, but not the presence-only one: the frequency penalty is applied
    "frequency and presence": (dict(frequency_penalty=2.0, presence_penalty=-2.0), False),
    "repetition below 1": (dict(repetition_penalty=0.1), True),
    "repetition and presence": (dict(repetition_penalty=1.5, presence_penalty=-2.0), True),
    "logit_bias": (dict(logit_bias={"300": 5.0, "301": -100}), True),
    "min_tokens over a forced EOS": (dict(min_tokens=4, logit_bias={EOS: 100}), True),
}


@pytest.mark.parametrize("name", list(PENALIZED))
def test_penalized_greedy_answers_follow_the_definitions(client, model, processor, name):
    extra, changes = PENALIZED[name]
    if "logit_bias" in extra:
        extra = {**extra, "logit_bias": {str(processor.eos_id) if t == EOS else t: v
                                         for t, v in extra["logit_bias"].items()}}
    fields = {k: ({int(t): v for t, v in val.items()} if k == "logit_bias" else val) for k, val in extra.items()}
    expected = greedy_reference(model, processor, MESSAGES, SamplingParams(temperature=0, max_tokens=8, **fields))
    plain = greedy_reference(model, processor, MESSAGES, SamplingParams(temperature=0, max_tokens=8))
    assert (expected != plain) == changes
    openai_fields = {k: v for k, v in extra.items() if k in ("presence_penalty", "frequency_penalty", "logit_bias")}
    vllm_fields = {k: v for k, v in extra.items() if k not in openai_fields}  # extensions: in the body as they are
    resp = create(client, temperature=0, max_tokens=8, extra_body=vllm_fields, **openai_fields)
    assert resp.choices[0].message.content == processor.decode(expected)


def test_logit_bias_forces_a_token(client, processor):
    resp = create(client, temperature=0.8, seed=1, max_tokens=3, logit_bias={"1500": 100})
    assert resp.choices[0].message.content == processor.decode([1500] * 3)


OUTSIDE = [
    ("presence_penalty", dict(presence_penalty=2.01)),
    ("presence_penalty", dict(presence_penalty=-2.01)),
    ("frequency_penalty", dict(frequency_penalty=2.01)),
    ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("repetition_penalty", dict(extra_body={"repetition_penalty": 0})),
    ("repetition_penalty", dict(extra_body={"repetition_penalty": -1.0})),
    ("min_p", dict(extra_body={"min_p": -0.01})),
    ("min_p", dict(extra_body={"min_p": 1.01})),
    ("min_tokens", dict(extra_body={"min_tokens": -1})),
    ("min_tokens", dict(max_tokens=4, extra_body={"min_tokens": 5})),
    ("n", dict(n=0)),
    ("n", dict(n=17)),
    ("logit_bias", dict(logit_bias={"5": 100.5})),
    ("logit_bias", dict(logit_bias={"5": -100.5})),
    ("logit_bias", dict(logit_bias={"abc": 1})),
    ("logit_bias", dict(logit_bias={"-5": 1})),
    ("logit_bias", dict(logit_bias={"131072": 1})),
    ("logit_bias", dict(logit_bias={str(i): 1 for i in range(1025)})),
]


@pytest.mark.parametrize("param, kwargs", OUTSIDE, ids=[f"{p}-{i}" for i, (p, _) in enumerate(OUTSIDE)])
def test_values_just_outside_a_range_are_a_400_naming_the_field(client, param, kwargs):
    with pytest.raises(openai.BadRequestError) as err:
        create(client, **{"max_tokens": 1, **kwargs})
    assert err.value.body["param"] == param, err.value.body


INSIDE = [
    dict(presence_penalty=2.0), dict(presence_penalty=-2.0), dict(frequency_penalty=2.0),
    dict(frequency_penalty=-2.0), dict(extra_body={"repetition_penalty": 1e-6}),
    dict(extra_body={"repetition_penalty": 5.0}), dict(extra_body={"min_p": 0.0}), dict(extra_body={"min_p": 1.0}),
    dict(extra_body={"min_tokens": 0}), dict(max_tokens=4, extra_body={"min_tokens": 4}), dict(n=1), dict(n=16),
    dict(logit_bias={"5": 100}), dict(logit_bias={"5": -100}), dict(logit_bias={"131071": 1}),
    dict(logit_bias={str(i): 1 for i in range(1024)}),
]


@pytest.mark.parametrize("kwargs", INSIDE, ids=[str(i) for i in range(len(INSIDE))])
def test_values_at_the_edges_are_accepted(client, kwargs):
    kwargs = {"max_tokens": 1, "temperature": 0.7, **kwargs}
    resp = create(client, **kwargs)
    assert len(resp.choices) == kwargs.get("n", 1)
    assert all(c.finish_reason in ("stop", "length") for c in resp.choices)
