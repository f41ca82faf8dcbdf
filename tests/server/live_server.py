"""A live server: uvicorn in a thread, on a free port, over an engine; and helpers to read its metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pixtral.engine import AsyncEngine, Engine, EngineConfig
from pixtral.server import ServerConfig, ServerState, build_app
from pixtral.server.connections import ConnectionLimits, run, uvicorn_config

MODEL_NAME = "tiny-pixtral"


class LiveServer:
    def __init__(self, app, limits: ConnectionLimits = ConnectionLimits()):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, limits, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=run, args=(self.server, [sock]), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(*args: str):
    """`pixtral serve ARGS... --port P` as a process (stdout and stderr in `proc.stdout`), healthy;
    yields (url, proc); terminated (then killed) at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pixtral.cli.main", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(url, proc), proc.stdout.read() if proc.poll() is not None else "the server did not start"
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServeProcess:
    """`pixtral serve --model CHECKPOINT ARGS...` as a real process on a free port, healthy once
    constructed (else the test fails with its log); `client` is the official openai client for it."""

    def __init__(self, checkpoint: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pixtral.cli.main", "serve", "--model", str(checkpoint), "--port",
                 str(self.port), "--served-model-name", MODEL_NAME, *args],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if not wait_healthy(self.url, self.proc):
            self.stop()
            pytest.fail(f"the server did not start:\n{self.output()[-4000:]}")
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_healthy(url: str, proc, timeout: float = 120.0) -> bool:
    """Poll `url`/health until it answers 200 (True); False once `proc` (a server process) has exited
    or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics: 'name' or 'name{label="value",...}' (labels sorted) -> value."""
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def wait_idle(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Wait until no request runs or waits; return the metrics then."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["pixtral_num_requests_running"] == 0 and m["pixtral_num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"still busy: {m}"
        time.sleep(0.05)


def start(model, processor, engine_config: EngineConfig, **server_options) -> tuple[LiveServer, AsyncEngine]:
    engine = AsyncEngine(Engine(model, processor, engine_config))
    options = {"model_name": MODEL_NAME, "max_images_per_request": 4, "max_request_bytes": 2 * 2**20,
               **server_options}
    return LiveServer(build_app(ServerState(engine), ServerConfig(**options))), engine
