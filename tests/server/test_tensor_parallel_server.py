"""`pixtral serve --tensor-parallel-size 2` as a real process (CPU, gloo): the server is rank 0 and
supervises one worker process.

Through the official openai client, streaming and not, alone and concurrently, its greedy answers
equal the one-process model's. SIGTERM stops the worker before the server exits; a worker killed
mid-stream makes the server answer 503, end the stream with an error and exit within seconds,
naming the rank and how it died. In every case no process of the server's is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import dropwhile

import httpx
import openai
import pytest
from live_server import MODEL_NAME, ServeProcess
from tiny_model import image_uri, user

from pixtral.generation import SamplingParams, chat

MAX_TOKENS = 8
CONVERSATIONS = [
    [user("Hello! What can you do?")],
    [user("What is in this picture?", image_uri(1))],
    [user("Compare these pictures.", image_uri(2), image_uri(3, (64, 48)), image_uri(4, (32, 96)))],
    [{"role": "system", "content": "You are terse."}, user("Look at this.", image_uri(5)),
     {"role": "assistant", "content": "A noisy picture."}, user("And this one? Same?", image_uri(6, (90, 60)))],
]


def children(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    """The pids still present after `timeout` seconds (zombies included: nobody reaped them)."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < deadline:
        left = {p for p in left if os.path.exists(f"/proc/{p}")}
        time.sleep(0.05)
    return left


def tp_server(checkpoint, log) -> ServeProcess:
    """The server at tensor-parallel size 2, with its descendants and its worker process."""
    live = ServeProcess(checkpoint, log, "--tensor-parallel-size", "2")
    live.descendants = children(live.proc.pid)
    live.workers = {p for p in live.descendants if "spawn_main" in cmdline(p)}
    return live


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    live = tp_server(tiny_dir, tmp_path_factory.mktemp("tp_server") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def references(model, processor):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return [chat(model, processor, messages, params).text for messages in CONVERSATIONS]


def ask(client, messages, stream: bool) -> str:
    if not stream:
        resp = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0,
                                              max_tokens=MAX_TOKENS)
        return resp.choices[0].message.content
    chunks = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0,
                                            max_tokens=MAX_TOKENS, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_the_server_runs_one_worker_process(server):
    assert len(server.workers) == 1  # rank 1; rank 0 is the server itself


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_answers_equal_one_process(server, references, stream):
    for messages, expected in zip(CONVERSATIONS, references):
        assert ask(server.client, messages, stream) == expected


def test_concurrent_requests_equal_one_process(server, references):
    jobs = [(i % len(CONVERSATIONS), bool(i % 3)) for i in range(12)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(server.client, CONVERSATIONS[job[0]], job[1]), jobs))
    assert answers == [references[i] for i, _ in jobs]


def test_sigterm_stops_every_worker_before_the_server_exits(server):
    procs = server.descendants
    assert procs
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == -signal.SIGTERM  # dies by the signal, as with one process
    assert "tensor parallelism: workers stopped" in server.output()
    assert not wait_gone(procs), f"left behind: {[cmdline(p) for p in wait_gone(procs, 0)]}"


def test_a_killed_worker_makes_the_server_answer_503_and_exit_naming_it(tiny_dir, tmp_path):
    live = tp_server(tiny_dir, tmp_path / "server.log")
    try:
        (worker,) = live.workers
        streamed, errors = [], []

        def stream() -> None:  # a long answer in flight when the worker dies
            try:
                for c in live.client.chat.completions.create(
                        model=MODEL_NAME, messages=[user("Tell me everything.")], temperature=0, max_tokens=600,
                        stream=True, extra_body={"ignore_eos": True}):
                    streamed.append(c)
            except openai.APIError as exc:
                errors.append(exc)

        reader = threading.Thread(target=stream)
        reader.start()
        deadline = time.monotonic() + 30
        while len(streamed) < 3:
            assert time.monotonic() < deadline and reader.is_alive(), "the stream did not start"
            time.sleep(0.01)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        health = []
        while live.proc.poll() is None and time.monotonic() - killed < 15:
            try:
                health.append(httpx.get(f"{live.url}/health", timeout=1).status_code)
            except httpx.HTTPError:
                health.append("refused")
            time.sleep(0.05)
        code = live.proc.wait(15)
        took = time.monotonic() - killed
        reader.join(15)
        out = live.output()
        assert code == 1, out[-3000:]
        assert took < 10
        after = list(dropwhile(lambda status: status == 200, health))  # (the kill takes a moment to land)
        assert after and set(after) <= {503, "refused"}, health  # never healthy again once the worker is gone
        assert f"error: tensor-parallel worker rank 1 (pid {worker}) died: killed by signal SIGKILL" in out
        assert errors and "died" in str(errors[0]) and len(streamed) < 600  # the stream ended with the error
        assert not wait_gone(live.descendants), [cmdline(p) for p in wait_gone(live.descendants, 0)]
    finally:
        live.stop()


def test_a_size_the_model_cannot_take_is_refused_at_once(tiny_dir):
    out = subprocess.run([sys.executable, "-m", "pixtral.cli.main", "serve", "--model", str(tiny_dir),
                          "--tensor-parallel-size", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "n_heads (4) is not divisible by the tensor-parallel size 3" in out.stderr
    assert "Traceback" not in out.stderr and "Uvicorn running" not in out.stderr
