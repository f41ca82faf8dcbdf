"""Bad requests: each gets a clear 4xx in OpenAI's error shape, and the server keeps serving.
Clients that go away cancel their requests. Afterwards no KV block is in use."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import httpx
import pytest
from live_server import MODEL_NAME, metrics, wait_idle
from PIL import Image
from tiny_model import image_uri, user

DROP = object()


def body(**changes) -> dict:
    base = {"model": MODEL_NAME, "messages": [user("hi")], "max_tokens": 2, "temperature": 0}
    for key, value in changes.items():
        if value is DROP:
            base.pop(key)
        else:
            base[key] = value
    return base


def with_image(url: str) -> dict:
    return body(messages=[user("What is this?", url)])


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a huge size but holds (almost) no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def real_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


# name: (request kwargs, status, error code or None)
CASES = {
    "invalid JSON": (dict(content=b'{"model": "x", "messages": ['), 400, "invalid_json"),
    "JSON that is not an object": (dict(json=[1, 2, 3]), 400, "invalid_json"),
    "empty body": (dict(content=b""), 400, "invalid_json"),
    "missing model": (dict(json=body(model=DROP)), 400, "invalid_request"),
    "missing messages": (dict(json=body(messages=DROP)), 400, "invalid_request"),
    "unknown model": (dict(json=body(model="gpt-4o")), 404, "model_not_found"),
    "empty messages": (dict(json=body(messages=[])), 400, "invalid_request"),
    "wrong role": (dict(json=body(messages=[{"role": "robot", "content": "hi"}])), 400, "invalid_request"),
    "assistant message last": (dict(json=body(messages=[user("hi"), {"role": "assistant", "content": "yo"}])),
                               400, "invalid_request"),
    "empty user message": (dict(json=body(messages=[{"role": "user", "content": ""}])), 400, "invalid_request"),
    "content of the wrong type": (dict(json=body(messages=[{"role": "user", "content": 42}])), 400, "invalid_request"),
    "message that is not an object": (dict(json=body(messages=["hello"])), 400, "invalid_request"),
    "unknown content part": (dict(json=body(messages=[{"role": "user", "content": [{"type": "audio"}]}])),
                             400, "invalid_request"),
    "image part without url": (dict(json=body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {}}, {"type": "text", "text": "hi"}]}])), 400, "invalid_request"),
    "invalid base64": (dict(json=with_image("data:image/png;base64,@@not*base64@@")), 400, "invalid_image"),
    "a file that is not an image": (dict(json=with_image(data_uri(b"just some text, no pixels"))), 400,
                                    "invalid_image"),
    "truncated image": (dict(json=with_image(data_uri(real_png()[:60]))), 400, "invalid_image"),
    "decompression bomb": (dict(json=with_image(data_uri(png_header(30000, 30000)))), 413, "image_too_large"),
    "over the pixel limit": (dict(json=with_image(data_uri(png_header(10000, 9000)))), 413, "image_too_large"),
    "too many images": (dict(json=body(messages=[user("hi", *[image_uri(1, (16, 16))] * 5)])), 400,
                        "too_many_images"),
    "remote image when not allowed": (dict(json=with_image("https://example.com/cat.png")), 400, "invalid_image"),
    "local file path": (dict(json=with_image("/etc/hostname")), 400, "invalid_image"),
    "file URL": (dict(json=with_image("file:///etc/hostname")), 400, "invalid_image"),
    "prompt longer than the context": (dict(json=body(messages=[user("word " * 3000)])), 400,
                                       "context_length_exceeded"),
    "max_tokens beyond the context": (dict(json=body(max_tokens=5000)), 400, "context_length_exceeded"),
    "negative max_tokens": (dict(json=body(max_tokens=-1)), 400, "invalid_request"),
    "max_tokens not a number": (dict(json=body(max_tokens="lots")), 400, "invalid_request"),
    "NaN temperature": (dict(content=b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
                                     b'"temperature": NaN}' % MODEL_NAME.encode()), 400, "invalid_request"),
    "negative temperature": (dict(json=body(temperature=-0.5)), 400, "invalid_request"),
    "top_p of zero": (dict(json=body(top_p=0)), 400, "invalid_request"),
    "too many choices (n=17)": (dict(json=body(n=17)), 400, "invalid_request"),
    "too many top_logprobs": (dict(json=body(logprobs=True, top_logprobs=50)), 400, "invalid_request"),
    "legacy functions": (dict(json=body(functions=[{"name": "f"}])), 400, "unsupported"),
    "a bad tool": (dict(json=body(tools=[{"type": "function", "function": {"name": "a b"}}])), 400, "invalid_request"),
    "presence penalty over 2": (dict(json=body(presence_penalty=2.5)), 400, "invalid_request"),
    "stop of the wrong type": (dict(json=body(stop=5)), 400, "invalid_request"),
    "seed out of range": (dict(json=body(seed=2**70, temperature=1.0)), 400, "invalid_request"),
    "body over the size limit": (dict(content=b"{" + b" " * (3 * 2**20) + b"}"), 413, "request_too_large"),
}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request(http, name):
    kwargs, status, code = CASES[name]
    if "content" in kwargs:
        kwargs = {**kwargs, "headers": {"content-type": "application/json"}}
    r = http.post("/v1/chat/completions", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    if code is not None:
        assert error["code"] == code, error
    assert http.get("/health").status_code == 200  # still serving


def test_routes_and_methods(http):
    r = http.post("/v1/embeddings", json=body())
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_bad_values_name_their_parameter(http):
    r = http.post("/v1/chat/completions", json=body(top_p=5))
    assert r.json()["error"]["param"] == "top_p"
    r = http.post("/v1/chat/completions", json=body(max_tokens="lots"))
    assert r.json()["error"]["param"] == "max_tokens"


def test_streaming_client_disconnect_frees_blocks(server):
    before = metrics(server.url).get('pixtral_request_success_total{finished_reason="abort"}', 0)
    # Sampling with top_p sorts the vocabulary every step: slow enough that the client leaves first.
    long = body(max_tokens=900, ignore_eos=True, stream=True, temperature=1.0, top_p=0.9,
                messages=[user("Tell me a long story.")])
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=long) as r:
            lines = r.iter_lines()
            next(lines)
            next(lines)
            assert metrics(server.url)["pixtral_kv_blocks_used"] > 0
    m = wait_idle(server.url)
    assert m["pixtral_kv_blocks_used"] == 0
    assert m['pixtral_request_success_total{finished_reason="abort"}'] == before + 1


def test_non_streaming_client_disconnect_frees_blocks(server):
    before = metrics(server.url).get('pixtral_request_success_total{finished_reason="abort"}', 0)
    long = body(max_tokens=900, ignore_eos=True, temperature=1.0, top_p=0.9,
                messages=[user("Tell me another long story.")])
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/chat/completions", json=long, timeout=0.3)
    deadline = time.monotonic() + 10
    while metrics(server.url).get('pixtral_request_success_total{finished_reason="abort"}', 0) < before + 1:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.05)
    assert wait_idle(server.url)["pixtral_kv_blocks_used"] == 0


def test_after_the_suite_no_block_is_in_use_and_good_requests_work(http, server):
    r = http.post("/v1/chat/completions", json=with_image(image_uri(9)))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    m = wait_idle(server.url)
    assert m["pixtral_kv_blocks_used"] == 0
    assert m["pixtral_num_requests_running"] == 0 and m["pixtral_num_requests_waiting"] == 0
    assert m['pixtral_http_errors_total{status="400"}'] >= 25
