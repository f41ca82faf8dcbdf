"""`pixtral serve` as a process, under load that once starved it: an oversized text body, concurrent
images at the pixel limit, floods of idle and half-sent connections, and slow bodies. Memory is
measured from the server process itself (/proc/PID/status)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from live_server import free_port, serve_process
from PIL import Image

from pixtral.server.connections import LoopErrorLog

MB = 2**20
IMAGE_MPIXELS = 24  # per test image; the server's per-image limit and decode budget are 25 MP
BYTES_PER_PIXEL = 25  # the bound docs/serving.md gives (measured: 19 for RGB PNGs, 23 for RGBA)
PIXEL_BUDGET = 25_000_000


@contextmanager
def serve(model_dir, *options: str):
    with serve_process("--model", str(model_dir), "--served-model-name", "tiny", *options) as (url, proc):
        yield url, proc


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


class PeakMemory:
    """The server's largest resident size while the block runs, sampled every 10 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self):
        self.before = rss_mb(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


@pytest.fixture(scope="module")
def limited(tiny_dir):
    with serve(tiny_dir, "--max-request-mb", "100", "--max-image-pixels", str(PIXEL_BUDGET),
               "--image-decode-mpixels", str(PIXEL_BUDGET / 1e6), "--max-image-mb", "20",
               "--header-timeout", "1.5", "--body-timeout", "1.5") as server:
        yield server


def chat(url: str, messages, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120,
                      json={"model": "tiny", "messages": messages, "max_tokens": 2, **fields})


def test_an_oversized_text_is_refused_before_tokenizing(limited):
    url, proc = limited
    assert chat(url, [{"role": "user", "content": "warm up"}]).status_code == 200
    body = json.dumps({"model": "tiny", "max_tokens": 2,
                       "messages": [{"role": "user", "content": "lorem ipsum " * (60 * MB // 12)}]}).encode()
    with PeakMemory(proc.pid) as memory:
        start = time.monotonic()
        response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=120,
                              headers={"content-type": "application/json"})
        elapsed = time.monotonic() - start
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert "characters of text" in response.json()["error"]["message"]
    # Tokenizing it took minutes and gigabytes; a bound this loose still catches that.
    assert elapsed < 10, elapsed
    grown = memory.peak - memory.before
    print(f"text body: {len(body) / MB:.0f} MB answered in {elapsed:.2f} s; server {memory.before:.0f} -> peak {memory.peak:.0f} MB")
    assert grown < 4 * len(body) / MB, f"the server grew by {grown:.0f} MB for a {len(body) / MB:.0f} MB body"
    assert chat(url, [{"role": "user", "content": "still here"}]).status_code == 200


def big_png(seed: int) -> str:
    """A 24-megapixel PNG of a few hundred KB (flat colour bands compress well)."""
    width, height = 6000, IMAGE_MPIXELS * 1_000_000 // 6000
    rng = np.random.default_rng(seed)
    row = rng.integers(0, 255, (1, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(row, height, axis=0)).save(buf, format="PNG", compress_level=9)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_concurrent_images_at_the_limit_stay_within_the_decode_budget(limited):
    url, proc = limited
    images = [big_png(i) for i in range(4)]
    assert chat(url, [{"role": "user", "content": "warm up"}]).status_code == 200
    settled = rss_mb(proc.pid)
    messages = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                              {"type": "text", "text": "What is it?"}]}] for uri in images]
    with PeakMemory(proc.pid) as memory, ThreadPoolExecutor(4) as pool:
        statuses = [r.status_code for r in pool.map(lambda m: chat(url, m), messages)]
    assert statuses == [200] * 4
    bound = BYTES_PER_PIXEL * PIXEL_BUDGET / MB
    grown = memory.peak - settled
    print(f"images: settled {settled:.0f} MB, peak {memory.peak:.0f} MB")
    assert grown < bound, f"peak {memory.peak:.0f} MB, {grown:.0f} MB over the settled {settled:.0f} MB (bound {bound:.0f})"
    time.sleep(0.5)
    after = rss_mb(proc.pid)
    print(f"images: after the burst {after:.0f} MB")
    assert after - settled < 0.2 * bound, f"{after - settled:.0f} MB stayed after the burst"


def partial_request(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    return s


def read_response(s: socket.socket) -> bytes:
    """One whole HTTP response (head and a Content-Length body) from a raw socket."""
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = s.recv(4096)
        if not piece:
            return data
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        piece = s.recv(4096)
        if not piece:
            break
        body += piece
    return head + b"\r\n\r\n" + body


def test_half_sent_headers_get_a_408_after_the_header_timeout(limited):
    url, _ = limited
    s = partial_request(url)
    start = time.monotonic()
    answer = read_response(s)
    assert answer.startswith(b"HTTP/1.1 408") and b"request headers" in answer, answer
    assert 1.0 < time.monotonic() - start < 5
    s.close()


def test_a_slow_body_gets_a_408_after_the_body_timeout(limited):
    url, _ = limited
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        answer = read_response(s)
    assert answer.startswith(b"HTTP/1.1 408") and b"request body did not arrive" in answer, answer


@pytest.fixture(scope="module")
def capped(tiny_dir):
    with serve(tiny_dir, "--max-connections", "32", "--header-timeout", "60") as server:
        yield server


def test_idle_half_open_connections_cannot_keep_a_client_out(capped):
    url, proc = capped
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    idle = [partial_request(url) for _ in range(400)]  # far over the cap, and they never finish
    try:
        start = time.monotonic()
        response = chat(url, [{"role": "user", "content": "hello"}])
        assert response.status_code == 200
        assert time.monotonic() - start < 1.0
        open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert open_fds < 32 + 64, f"the server holds {open_fds} file descriptors"
    finally:
        for s in idle:
            s.close()


def test_over_the_cap_with_every_connection_busy_is_a_503(tiny_dir):
    with serve(tiny_dir, "--max-connections", "2") as (url, _):
        host, port = url.removeprefix("http://").split(":")
        busy = []
        for _ in range(2):  # a request whose body is still arriving is running: it is not evicted
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{")
            busy.append(s)
        time.sleep(0.3)
        third = httpx.get(f"{url}/health", timeout=10)
        assert third.status_code == 503 and third.json()["error"]["code"] == "too_many_connections"
        for s in busy:
            s.close()
        time.sleep(0.3)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # room again


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_empty_api_key_is_refused_at_start(tiny_dir, how):
    args = [sys.executable, "-m", "pixtral.cli.main", "serve", "--model", str(tiny_dir), "--port", str(free_port())]
    env = dict(os.environ)
    if how == "flag":
        args += ["--api-key", "  "]
    else:
        env["PIXTRAL_API_KEY"] = ""
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert ("--api-key is empty" if how == "flag" else "$PIXTRAL_API_KEY is empty") in result.stderr + result.stdout


def test_loop_errors_are_logged_once_per_interval(caplog):
    handler = LoopErrorLog(interval_s=0.3)
    with caplog.at_level(logging.ERROR, logger="pixtral.server"):
        for _ in range(5000):
            handler(None, {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many")})
        time.sleep(0.35)
        handler(None, {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many")})
    records = [r for r in caplog.records if "accept" in r.getMessage()]
    assert len(records) == 2
    assert records[0].exc_info is not None and records[1].exc_info is None  # a traceback only the first time
    assert "4999 more like it" in records[1].getMessage()


def test_a_negative_prefill_cap_is_refused_at_start(tiny_dir):
    args = [sys.executable, "-m", "pixtral.cli.main", "serve", "--model", str(tiny_dir), "--port", str(free_port()),
            "--prefill-tokens-while-decoding", "-1"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--prefill-tokens-while-decoding must be 0 (no cap) or positive, got -1" in result.stderr + result.stdout
