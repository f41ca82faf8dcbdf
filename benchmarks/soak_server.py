"""Soak `pixtral serve`: valid and bad requests, disconnects and slow clients, mixed, for N minutes.

    python benchmarks/soak_server.py --minutes 10                 # starts a server on the default model
    python benchmarks/soak_server.py --url http://127.0.0.1:8000  # or soaks one already running

Every client loops until the time (or --max-requests) is up, picking one of: a valid chat (text or
an example image, streamed or not, through the official openai client), a chat with extreme but
valid sampling values, a bad request (invalid JSON, invalid Unicode, out-of-range values, a text
too long for the context, an image over the pixel limit, an unknown model), a stream abandoned
after its first chunk, a client that sends half its headers and goes quiet, and a burst of idle
connections. It prints requests served, answers by status, lost requests (a valid request without
a whole answer, or any request answered 5xx or not at all: must be 0), and the server's peak and
final memory. Loopback only.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
from servers import NotReady, free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pixtral"


def example_image_uri(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode((ROOT / "examples" / name).read_bytes()).decode()


def too_large_image_uri(width: int = 20000, height: int = 20000) -> str:
    """A PNG whose header claims 400 megapixels (a decompression bomb): refused from its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


class Soak:
    def __init__(self, url: str, deadline: float, max_requests: int, seed: int):
        self.url, self.deadline, self.max_requests = url, deadline, max_requests
        self.lock = threading.Lock()
        self.statuses: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.lost: list[str] = []
        self.served = self.started = 0
        self.rng = random.Random(seed)
        self.images = [example_image_uri(n) for n in ("chart.png", "table.png", "diagram.png")]
        self.huge_image = too_large_image_uri()
        host = urlparse(url)
        self.address = (host.hostname, host.port or 80)

    # ------------------------------------------------------------------ bookkeeping
    def take(self) -> bool:
        with self.lock:
            if time.monotonic() > self.deadline or self.started >= self.max_requests:
                return False
            self.started += 1
            return True

    def record(self, kind: str, status: str, lost: str | None = None, served: bool = False) -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.statuses[status] += 1
            self.served += served
            if lost:
                self.lost.append(f"{kind}: {lost}")

    # ------------------------------------------------------------------ clients
    def run_client(self, index: int) -> None:
        rng = random.Random(self.rng.random())
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="soak", max_retries=0, timeout=300)
        kinds = [(self.valid, 5), (self.extreme, 2), (self.bad, 4), (self.disconnect, 1), (self.slow, 1),
                 (self.idle_burst, 0.2)]
        while self.take():
            action = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
            try:
                action(client, rng)
            except Exception as exc:  # noqa: BLE001 - whatever it was, the request is lost
                self.record(action.__name__, "no answer", f"{type(exc).__name__}: {exc}")

    def _chat(self, client, rng, kind: str, **sampling) -> None:
        content = rng.choice(["What is the largest value?", "Describe the picture.", "Say hello."])
        if rng.random() < 0.5:
            content = [{"type": "image_url", "image_url": {"url": rng.choice(self.images)}},
                       {"type": "text", "text": content}]
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": content}],
                      max_tokens=rng.randint(1, 24), **sampling)
        try:
            if rng.random() < 0.5:
                choice = client.chat.completions.create(**kwargs).choices[0]
                finish = choice.finish_reason
            else:
                finish = None
                for chunk in client.chat.completions.create(stream=True, **kwargs):
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
        except openai.APIStatusError as exc:
            status = exc.status_code
            self.record(kind, str(status), None if status in (429,) else f"HTTP {status}: {exc.message}")
            return
        if finish in ("stop", "length"):
            self.record(kind, "200", served=True)
        else:
            self.record(kind, "200", f"answer ended without a finish reason ({finish})")

    def valid(self, client, rng) -> None:
        self._chat(client, rng, "valid", temperature=rng.choice([0, 0.7, 1.0]))

    def extreme(self, client, rng) -> None:
        values = rng.choice([
            {"temperature": 5e-324}, {"temperature": 1.7976931348623157e308}, {"top_p": 5e-324},
            {"extra_body": {"top_k": 2**64}}, {"seed": 2**64 - 1, "temperature": 1e-300, "top_p": 1e-45},
            {"logprobs": True, "top_logprobs": 20, "temperature": 1e300}])
        self._chat(client, rng, "extreme", **values)

    def bad(self, client, rng) -> None:
        base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        name, body = rng.choice([
            ("invalid JSON", b'{"model": "pixtral", "messages": ['),
            ("lone surrogate", json.dumps(base).replace('"hi"', '"hi \\ud800"').encode()),
            ("invalid UTF-8", json.dumps(base).encode().replace(b'"hi"', b'"\xff\xfe"')),
            ("top_p 0", json.dumps({**base, "top_p": 0}).encode()),
            ("negative temperature", json.dumps({**base, "temperature": -1e-300}).encode()),
            ("seed 2**64", json.dumps({**base, "seed": 2**64}).encode()),
            ("unknown model", json.dumps({**base, "model": "nope"}).encode()),
            ("text too long", json.dumps({**base, "messages": [{"role": "user", "content": "ab " * 3_000_000}]}).encode()),
            ("image over the limit", json.dumps({**base, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": self.huge_image}}]}]}).encode()),
        ])
        response = httpx.post(f"{self.url}/v1/chat/completions", content=body, timeout=300,
                              headers={"content-type": "application/json"})
        ok = 400 <= response.status_code < 500 and "error" in response.json()
        self.record(f"bad: {name}", str(response.status_code), None if ok else f"{name}: HTTP {response.status_code}")

    def disconnect(self, client, rng) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Talk for a while."}], "max_tokens": 200,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=300) as response:
            status = response.status_code
            for _ in response.iter_lines():
                break  # go away after the first event
        self.record("disconnect", str(status), None if status == 200 else f"HTTP {status}")

    def slow(self, client, rng) -> None:
        with socket.create_connection(self.address, timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\n")
            time.sleep(rng.uniform(0.5, 3.0))
        self.record("slow headers", "closed by client")

    def idle_burst(self, client, rng) -> None:
        sockets = []
        try:
            for _ in range(50):
                s = socket.create_connection(self.address, timeout=30)
                s.sendall(b"GET /health HTTP/1.1\r\n")
                sockets.append(s)
            time.sleep(1.0)
        finally:
            for s in sockets:
                s.close()
        self.record("idle burst", "closed by client")


class MemoryWatch(threading.Thread):
    def __init__(self, pid: int | None):
        super().__init__(daemon=True)
        self.pid, self.peak, self.last, self.stop = pid, 0.0, 0.0, threading.Event()

    def read(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    def run(self) -> None:
        while self.pid and not self.stop.is_set():
            self.last = self.read()
            self.peak = max(self.peak, self.last)
            time.sleep(0.2)


def start_server(model: str | None, port: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "pixtral.cli.main", "serve", "--port", str(port), "--served-model-name", MODEL]
    if model:
        args += ["--model", model]
    log = open(os.devnull, "w")
    return subprocess.Popen(args, stdout=log, stderr=log)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--url", help="soak this server (loopback only) instead of starting one")
    p.add_argument("--model", help="checkpoint for the server it starts (default: the packaged default model)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not 0 < args.minutes <= 120 or args.clients < 1 or args.max_requests < 1:
        raise SystemExit("--minutes must be in (0, 120], --clients and --max-requests at least 1")

    server = None
    if args.url:
        url = args.url.rstrip("/")
        host = urlparse(url).hostname or ""
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise SystemExit(f"{host}: the soak sends traffic to loopback addresses only")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args.model, port)
    try:
        try:
            wait_ready(url, server)
        except NotReady as exc:
            raise SystemExit(str(exc)) from None
        watch = MemoryWatch(server.pid if server else None)
        watch.start()
        start_mb = watch.read() if server else 0.0
        soak = Soak(url, time.monotonic() + args.minutes * 60, args.max_requests, args.seed)
        started = time.monotonic()
        clients = [threading.Thread(target=soak.run_client, args=(i,)) for i in range(args.clients)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        elapsed = time.monotonic() - started
        time.sleep(2.0)  # let the server settle (aborted streams, closed connections)
        health = httpx.get(f"{url}/health", timeout=10).status_code
        watch.stop.set()
        final = watch.read() if server else 0.0
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)

    print(f"soak of {url} for {elapsed / 60:.1f} min with {args.clients} clients")
    print(f"requests: {soak.started} started, {soak.served} valid ones served")
    print("by kind:   " + ", ".join(f"{k} {n}" for k, n in sorted(soak.kinds.items())))
    print("by status: " + ", ".join(f"{k} {n}" for k, n in sorted(soak.statuses.items())))
    print(f"lost requests: {len(soak.lost)}")
    for line in soak.lost[:20]:
        print(f"  {line}")
    if server is not None:
        print(f"server memory: {start_mb:.0f} MB at the start, peak {watch.peak:.0f} MB, final {final:.0f} MB")
    print(f"/health at the end: {health}")
    return 0 if not soak.lost and health == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
