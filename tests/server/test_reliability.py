"""No single request can stop the server: extreme sampling values (each type-valid, at both ends of
its range, alone and combined, seeded or not, streamed or not) while other streams run, and
invalid Unicode anywhere in a request. Each gets a 200 or a 4xx in JSON naming the problem; the
running streams finish with the answers they give alone, and /health stays 200."""

from __future__ import annotations

import itertools
import json
import threading

import httpx
import openai
import pytest
from live_server import MODEL_NAME, wait_idle
from tiny_model import image_uri, user

VOCAB = 131072
CONTEXT = 1024  # tiny_model.MAX_SEQ_LEN
BACKGROUND_TOKENS = 40

# (field, value, ok): every value is of the type the API takes; ok says whether it is in range.
EXTREMES = [
    ("temperature", 0.0, True), ("temperature", 5e-324, True), ("temperature", 1e-5, True),
    ("temperature", 1.7976931348623157e308, True), ("temperature", -5e-324, False), ("temperature", -1.0, False),
    ("top_p", 5e-324, True), ("top_p", 1e-45, True), ("top_p", 1.0, True), ("top_p", 0.0, False),
    ("top_p", 1.0000000000000002, False),
    ("top_k", -1, True), ("top_k", 0, True), ("top_k", 1, True), ("top_k", VOCAB, True), ("top_k", VOCAB + 1, True),
    ("top_k", 2**63, True), ("top_k", 2**64 + 1, True), ("top_k", -2, False), ("top_k", -(2**63), False),
    ("seed", -(2**63), True), ("seed", 2**64 - 1, True), ("seed", 2**64, False), ("seed", -(2**63) - 1, False),
    ("max_tokens", 1, True), ("max_tokens", 0, False), ("max_tokens", 2**63, False),
    ("top_logprobs", 0, True), ("top_logprobs", 20, True), ("top_logprobs", 21, False), ("top_logprobs", -1, False),
    ("stop", ["a"] * 64, True), ("stop", ["a"] * 65, False), ("stop", "x" * 1000, True), ("stop", "x" * 1001, False),
    ("stop_token_ids", [0, VOCAB - 1, 2**70], True), ("stop_token_ids", [-1], False),
]
COMBINED = [
    {"temperature": 5e-324, "top_p": 5e-324, "top_k": 2**64 + 1},
    {"temperature": 1.7976931348623157e308, "top_p": 1e-45, "top_k": VOCAB + 1},
    {"temperature": 1.7976931348623157e308, "top_p": 1.0, "top_k": -1},
    {"temperature": 1e-5, "top_p": 5e-324, "top_k": 1},
]
# The field the error names where it differs from the one set.
NAMED = {"top_logprobs": "top_logprobs", "max_tokens": None}


def cases():
    for (field, value, ok), seed, stream in itertools.product(EXTREMES, (None, 7), (False, True)):
        if field == "seed" and seed is not None:
            continue
        body = {field: value, "seed": seed} if field != "seed" else {field: value}
        if field == "top_logprobs":
            body["logprobs"] = True
        yield pytest.param(body, ok, field, stream, id=f"{field}={str(value)[:20]}-seed={seed}-stream={stream}")
    for values, seed, stream in itertools.product(COMBINED, (None, 2**64 - 1), (False, True)):
        yield pytest.param({**values, "seed": seed, "logprobs": True, "top_logprobs": 20}, True, None, stream,
                           id=f"combined-{values}-seed={seed}-stream={stream}")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def background(server):
    """Greedy streams that run through the whole table; each must end with its reference answer."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    conversations = [[user(f"Keep talking about topic {i}.")] for i in range(3)] + \
                    [[user("Describe it.", image_uri(11))]]

    def ask(messages, stream):
        kwargs = dict(model=MODEL_NAME, messages=messages, max_tokens=BACKGROUND_TOKENS, temperature=0,
                      extra_body={"ignore_eos": True})
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        pieces, finish = [], None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        return "".join(pieces)

    expected = [ask(c, stream=False) for c in conversations]
    results: dict[int, str] = {}
    stop = threading.Event()

    def loop(i):
        while not stop.is_set():  # keep a stream running while the table runs
            results[i] = ask(conversations[i], stream=True)
            assert results[i] == expected[i], f"background stream {i} changed its answer"

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(conversations))]
    for t in threads:
        t.start()

    def finish() -> None:
        stop.set()
        for t in threads:
            t.join(120)
        assert results == dict(enumerate(expected))

    yield finish
    finish()


def post(http, body: dict, stream: bool) -> httpx.Response:
    payload = {"model": MODEL_NAME, "messages": [user("Tell me something.")], "max_tokens": 4, **body}
    if payload.get("seed") is None:
        payload.pop("seed", None)
    if not stream:
        return http.post("/v1/chat/completions", json=payload)
    with http.stream("POST", "/v1/chat/completions", json={**payload, "stream": True}) as response:
        response.read()
        return response


@pytest.mark.parametrize("body, ok, field, stream", list(cases()))
def test_extreme_sampling_values(http, background, body, ok, field, stream):
    response = post(http, body, stream)
    if ok:
        assert response.status_code == 200, response.text
        if stream:
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert not any("error" in c for c in chunks), response.text
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        named = NAMED.get(field, field)
        if named is not None:
            assert error["param"] == named, error
        assert field in error["message"] or (field == "max_tokens" and "max_tokens" in error["message"]), error
    assert http.get("/health").status_code == 200


# ---------------------------------------------------------------------- invalid Unicode
SURROGATE = "\\ud800"  # as JSON spells it: a lone high surrogate, which UTF-8 cannot encode


def raw(text_body: str) -> bytes:
    return text_body.encode("ascii")


def base(**fields) -> str:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update(fields)
    return json.dumps(body)


UNICODE_CASES = {
    "text content": raw(base().replace('"hi"', f'"hi {SURROGATE} there"')),
    "text part": raw(base(messages=[{"role": "user", "content": [{"type": "text", "text": "X"}]}])
                     .replace('"X"', f'"{SURROGATE}"')),
    "image URL": raw(base(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "U"}}]}]).replace('"U"', f'"data:image/png;base64,{SURROGATE}"')),
    "remote image URL": raw(base(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "U"}}]}]).replace('"U"', f'"https://x{SURROGATE}.example/a.png"')),
    "message name": raw(base(messages=[{"role": "user", "content": "hi", "name": "N"}]).replace('"N"', f'"{SURROGATE}"')),
    "role": raw(base(messages=[{"role": "R", "content": "hi"}]).replace('"R"', f'"user{SURROGATE}"')),
    "stop string": raw(base(stop=["S"]).replace('"S"', f'"{SURROGATE}"')),
    "model name": raw(base(model="M").replace('"M"', f'"{SURROGATE}"')),
    "a key": raw(base().replace('"max_tokens"', f'"max{SURROGATE}"')),
    "low surrogate": raw(base().replace('"hi"', '"\\udfff"')),
    "system message": raw(base(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}])
                          .replace('"S"', f'"{SURROGATE}"')),
    "UTF-8 encoded surrogate": base().replace('"hi"', '"hi XX"').encode().replace(b"XX", b"\xed\xa0\x80"),
    "invalid UTF-8": base().replace('"hi"', '"hi XX"').encode().replace(b"XX", b"\xff\xfe"),
    "truncated UTF-8": base().replace('"hi"', '"hi XX"').encode().replace(b"XX", b"\xe2\x82"),
    "overlong UTF-8": base().replace('"hi"', '"hi XX"').encode().replace(b"XX", b"\xc0\xaf"),
    "NUL in text": raw(base().replace('"hi"', '"hi \\u0000 there"')),
    "noncharacter": raw(base().replace('"hi"', '"hi \\uffff \\ufffe"')),
}


@pytest.mark.parametrize("name", list(UNICODE_CASES))
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_unicode_is_a_4xx_in_json(http, name, stream):
    body = UNICODE_CASES[name]
    if stream:
        body = body.replace(b'"max_tokens"', b'"stream": true, "max_tokens"', 1)
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code == 200:  # valid text after all (NUL, noncharacters): a normal answer
        assert name in ("NUL in text", "noncharacter")
        return
    error = json.loads(response.content.decode("utf-8"))["error"]  # strict UTF-8 JSON, whatever we sent
    assert error["message"] and error["type"] == "invalid_request_error"
    assert response.status_code in (400, 404, 413)
    if name not in ("invalid UTF-8", "truncated UTF-8", "overlong UTF-8"):
        assert "Unicode" in error["message"] or "surrogate" in error["message"] or "JSON" in error["message"], error


def test_after_the_suite_the_streams_are_intact_and_the_engine_idle(http, server, background):
    background()  # every background stream ended with its answer
    m = wait_idle(server.url)
    assert m["pixtral_kv_blocks_used"] == 0 and m['pixtral_request_success_total{finished_reason="error"}'] == 0
    assert http.get("/health").status_code == 200
    response = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": [user("hi")], "max_tokens": 2})
    assert response.status_code == 200
