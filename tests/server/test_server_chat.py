"""The live server through the official openai client: answers equal the model's own greedy output."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest
from live_server import MODEL_NAME, start, wait_idle
from tiny_model import image_uri, user

from pixtral.engine import EngineConfig
from pixtral.generation import SamplingParams, chat
from pixtral.server import ServerState, build_app

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def reference(model, processor, messages, max_tokens=MAX_TOKENS):
    return chat(model, processor, messages, SamplingParams(temperature=0, max_tokens=max_tokens))


CONVERSATIONS = {
    "text": [user("Hello! What can you do?")],
    "one image": [user("What is in this picture?", image_uri(1))],
    "several images": [user("Compare these pictures.", image_uri(2), image_uri(3, (64, 48)), image_uri(4, (32, 96)))],
    "multi-turn": [
        {"role": "system", "content": "You are terse."},
        user("Look at this.", image_uri(5)),
        {"role": "assistant", "content": "A noisy picture."},
        user("And this one? Same?", image_uri(6, (90, 60))),
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_greedy_answer_equals_model_output(client, model, processor, name):
    messages = CONVERSATIONS[name]
    ref = reference(model, processor, messages)
    resp = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].finish_reason == ref.finish_reason
    assert resp.usage.prompt_tokens == ref.prompt_tokens
    assert resp.usage.prompt_tokens_details.image_tokens == ref.image_tokens
    assert resp.usage.completion_tokens == len(ref.token_ids) + (ref.finish_reason == "stop")

    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0,
                                            max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.prompt_tokens == ref.prompt_tokens and not chunks[-1].choices


def test_stop_seed_and_logprobs(client, model, processor):
    messages = CONVERSATIONS["one image"]
    seeded = dict(model=MODEL_NAME, messages=messages, temperature=0.9, top_p=0.95, seed=7, max_tokens=MAX_TOKENS)
    a = client.chat.completions.create(**seeded).choices[0].message.content
    b = client.chat.completions.create(**seeded).choices[0].message.content
    assert a == b == chat(model, processor, messages, SamplingParams(temperature=0.9, top_p=0.95, seed=7,
                                                                     max_tokens=MAX_TOKENS)).text
    ref = reference(model, processor, messages)
    word = ref.text.split()[1]
    stopped = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0,
                                             max_tokens=MAX_TOKENS, stop=[word])
    assert stopped.choices[0].message.content == ref.text.split(word)[0]
    assert stopped.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=3,
                                        logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)


def test_models_health_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("pixtral_num_requests_waiting", "pixtral_num_requests_running", "pixtral_kv_blocks_used",
                 "pixtral_generation_tokens_total"):
        assert f"\n{name} " in text


def test_64_concurrent_streaming_clients(server, model, processor):
    convs = [[user(f"Question number {i}: what is this?", *([image_uri(20 + i, (48, 40))] if i % 2 else []))]
             for i in range(8)]
    refs = [reference(model, processor, conv, max_tokens=6).text for conv in convs]

    async def one(client, i):
        stream = await client.chat.completions.create(model=MODEL_NAME, messages=convs[i % 8], temperature=0,
                                                      max_tokens=6, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    texts = asyncio.run(main())
    assert texts == [refs[i % 8] for i in range(64)]
    m = wait_idle(server.url)
    assert m["pixtral_kv_blocks_used"] == 0


def test_api_key(model, processor):
    live, engine = start(model, processor, EngineConfig(num_blocks=64), api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert err.value.body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret", max_retries=0)
        resp = good.chat.completions.create(model=MODEL_NAME, messages=[user("hi")], max_tokens=2)
        assert resp.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(f"{live.url}/health").status_code == 200  # health and metrics stay open
    finally:
        live.stop()
        engine.shutdown()


def test_not_ready_is_503():
    from fastapi.testclient import TestClient

    with TestClient(build_app(ServerState())) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        r = client.post("/v1/chat/completions", json={"model": "x", "messages": [user("hi")]})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert "pixtral_ready 0" in client.get("/metrics").text


def test_full_queue_is_429(model, processor):
    live, engine = start(model, processor, EngineConfig(num_blocks=64, max_num_seqs=1, max_num_batched_tokens=16,
                                                        max_waiting=1))
    gate = threading.Event()  # hold the engine before its next step: the queue stays as it is
    real_step = engine.engine.step
    engine.engine.step = lambda: gate.wait() and real_step()
    body = {"model": MODEL_NAME, "messages": [user("Talk.")], "max_tokens": 5, "stream": True}
    try:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as first:
                assert first.status_code == 200  # accepted: it waits (the engine is held)
                r = http.post("/v1/chat/completions", json=body)
                assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
                assert r.headers["retry-after"] == "1"
                gate.set()
                assert "[DONE]" in first.read().decode()
        m = wait_idle(live.url)
        assert m["pixtral_kv_blocks_used"] == 0
    finally:
        gate.set()
        live.stop()
        engine.shutdown()
