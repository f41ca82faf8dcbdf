"""Serving benchmark in the manner of vLLM's `benchmark_serving`: image chats against OpenAI-compatible
servers, side by side, on the same requests.

    python benchmarks/bench_serving.py                                   # the default model, ours and transformers
    python benchmarks/bench_serving.py --model CKPT --rates 0.5,1,inf --requests 64
    python benchmarks/bench_serving.py --endpoint NAME=URL ...           # servers already running

It starts `pixtral serve` on a Mistral-layout checkpoint and `transformers serve --continuous-batching`
on its Hugging Face export (written with `pixtral convert --to hf` when absent), sends each the same
image chats (images of mixed sizes, answers of mixed lengths, greedy) arriving as a Poisson process
at each rate (`inf`: all at once), each chat followed by a follow-up question on the same image
(`--turns 2`), and prints per server and rate: requests/s, output tokens/s, and p50/p90/p99 of time
to first token, time per output token and end-to-end latency, first turns and follow-ups apart.
Every request streams through the official `openai` client. Greedy answers of the servers are
compared request by request. Loopback only; bounded by --requests and --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(224, 224), (512, 384), (384, 768), (1024, 1024)]  # mixed: the model resizes each its own way
QUESTIONS = ["What is the title of this picture?", "Describe this picture.", "What is the largest value?",
             "List every label you can read."]
FOLLOW_UPS = ["And the smallest one?", "Which colours are used?", "Say that again in one sentence."]
ANSWER_LENGTHS = [16, 48, 128]


# ---------------------------------------------------------------------- workload
@dataclass
class Chat:
    index: int
    image: str  # data URI
    question: str
    follow_up: str
    max_tokens: int

    def first_turn(self) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": self.image}},
                                             {"type": "text", "text": self.question}]}]

    def second_turn(self, answer: str) -> list[dict]:
        return [*self.first_turn(), {"role": "assistant", "content": answer},
                {"role": "user", "content": self.follow_up}]


def make_chats(n: int, seed: int) -> list[Chat]:
    rng = random.Random(seed)
    sources = sorted((ROOT / "examples").glob("*.png"))
    images = {}
    for path in sources:
        for size in SIZES:
            buf = io.BytesIO()
            Image.open(path).convert("RGB").resize(size, Image.BICUBIC).save(buf, format="PNG")
            images[(path.name, size)] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    keys = sorted(images)
    return [Chat(i, images[rng.choice(keys)], rng.choice(QUESTIONS), rng.choice(FOLLOW_UPS),
                 rng.choice(ANSWER_LENGTHS)) for i in range(n)]


# ---------------------------------------------------------------------- one server
@dataclass
class Result:
    chat: int
    turn: int
    start: float
    first_token: float | None = None
    end: float | None = None
    output_tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.first_token - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        return (self.end - self.first_token) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def stream(client: openai.AsyncOpenAI, model: str, messages: list[dict], max_tokens: int,
                 result: Result) -> Result:
    try:
        response = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        pieces, chunks = [], 0
        async for chunk in response:
            if chunk.usage is not None:
                result.output_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if result.first_token is None:
                    result.first_token = time.perf_counter()
                pieces.append(chunk.choices[0].delta.content)
                chunks += 1
        result.end = time.perf_counter()
        result.text = "".join(pieces)
        result.output_tokens = result.output_tokens or chunks  # a server without usage: one token a chunk
        if result.first_token is None:
            result.first_token = result.end
    except Exception as exc:  # noqa: BLE001 - recorded, and reported with the results
        result.error = f"{type(exc).__name__}: {exc}"
        result.end = time.perf_counter()
    return result


async def run_chat(client, model: str, chat: Chat, turns: int, at: float) -> list[Result]:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    first = await stream(client, model, chat.first_turn(), chat.max_tokens, Result(chat.index, 1, time.perf_counter()))
    results = [first]
    if turns > 1 and first.error is None:
        second = Result(chat.index, 2, time.perf_counter())
        results.append(await stream(client, model, chat.second_turn(first.text), chat.max_tokens, second))
    return results


async def run_load(url: str, model: str, chats: list[Chat], rate: float, turns: int, seed: int,
                   timeout: float) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=timeout,
                                http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=1024)))
    start, at, tasks = time.perf_counter(), time.perf_counter(), []
    for chat in chats:
        tasks.append(asyncio.create_task(run_chat(client, model, chat, turns, at)))
        if math.isfinite(rate):
            at += rng.expovariate(rate)
    results = [r for rs in await asyncio.gather(*tasks) for r in rs]
    await client.close()
    return results, time.perf_counter() - start


# ---------------------------------------------------------------------- report
def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return f"{q[49] * 1e3:.0f} / {q[89] * 1e3:.0f} / {q[98] * 1e3:.0f}"


def summarize(name: str, rate: float, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    out = {"server": name, "rate": rate, "requests": len(results), "errors": len(results) - len(ok),
           "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r.output_tokens for r in ok) / wall}
    for turn, label in ((1, "first"), (2, "follow_up")):
        rs = [r for r in ok if r.turn == turn]
        out[f"ttft_{label}_ms"] = percentiles([r.ttft for r in rs])
        out[f"tpot_{label}_ms"] = percentiles([r.tpot for r in rs if r.tpot is not None])
        out[f"e2e_{label}_ms"] = percentiles([r.e2e for r in rs])
    return out


ROWS = [("requests", "requests"), ("errors", "errors"), ("requests/s", "requests_per_s"),
        ("output tokens/s", "output_tokens_per_s"), ("TTFT p50/p90/p99 ms, first turn", "ttft_first_ms"),
        ("TTFT p50/p90/p99 ms, follow-up", "ttft_follow_up_ms"), ("TPOT p50/p90/p99 ms", "tpot_first_ms"),
        ("E2E p50/p90/p99 ms, first turn", "e2e_first_ms"), ("E2E p50/p90/p99 ms, follow-up", "e2e_follow_up_ms")]


def table(summaries: list[dict]) -> str:
    names = [f"{s['server']} @ {s['rate']:g}/s" for s in summaries]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in ROWS:
        cells = [f"{s[key]:.2f}" if isinstance(s[key], float) else str(s[key]) for s in summaries]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement(by_server: dict[str, list[Result]]) -> str:
    """How many requests every server answered with the same text (greedy: they should)."""
    names = list(by_server)
    if len(names) < 2:
        return "one server: no comparison"
    answers = [{(r.chat, r.turn): r.text for r in by_server[n] if r.error is None} for n in names]
    common = set.intersection(*(set(a) for a in answers))
    same = sum(len({a[k] for a in answers}) == 1 for k in common)
    return f"greedy answers equal on {same} of {len(common)} requests ({' vs '.join(names)})"


# ---------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} was not ready within {timeout:g} s")


def start_ours(model: Path, port: int, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pixtral.cli.main", "serve", "--model", str(model),
                             "--port", str(port), "--served-model-name", "bench", "--max-num-seqs", "256",
                             "--max-connections", "2048"], stdout=log, stderr=subprocess.STDOUT)


def start_transformers(hf_model: Path, port: int, log) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("transformers")
    return subprocess.Popen([str(exe), "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
                             str(hf_model)], stdout=log, stderr=subprocess.STDOUT)


def hf_export(model: Path, out: Path) -> Path:
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "pixtral.cli.main", "convert", str(model), str(out), "--to", "hf"],
                       check=True)
    return out


def served_name(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Mistral-layout checkpoint (default: the embedded default model)")
    p.add_argument("--hf-model", help="its Hugging Face export (default: written next to a temporary folder)")
    p.add_argument("--servers", default="pixtral,transformers", help="which to start (default both)")
    p.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                   help="a server already running (loopback), instead of or besides the ones started")
    p.add_argument("--rates", default="inf", help="arrival rates in chats/s, comma-separated; inf: all at once")
    p.add_argument("--requests", type=int, default=32, help="chats per rate (default 32)")
    p.add_argument("--turns", type=int, choices=(1, 2), default=2, help="2: a follow-up on the same image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--json", help="write the summaries here")
    args = p.parse_args()
    if args.requests < 1:
        raise SystemExit("--requests must be at least 1")
    rates = [math.inf if r.strip() == "inf" else float(r) for r in args.rates.split(",")]
    if any(not r > 0 for r in rates):
        raise SystemExit("--rates must be positive numbers or inf")

    from pixtral.assets import default_model_dir

    model = Path(args.model) if args.model else default_model_dir()
    workdir = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    endpoints: dict[str, str] = {}
    procs: list[subprocess.Popen] = []
    log = open(workdir / "servers.log", "w")
    try:
        for name in filter(None, args.servers.split(",")):
            port = free_port()
            if name == "pixtral":
                procs.append(start_ours(model, port, log))
            elif name == "transformers":
                procs.append(start_transformers(Path(args.hf_model) if args.hf_model else
                                                hf_export(model, workdir / "hf"), port, log))
            else:
                raise SystemExit(f"--servers: unknown server {name!r} (pixtral, transformers)")
            endpoints[name] = f"http://127.0.0.1:{port}"
            wait_ready(endpoints[name], procs[-1], args.startup_timeout)
        for spec in args.endpoint:
            name, _, url = spec.partition("=")
            endpoints[name] = url.rstrip("/")
        if not endpoints:
            raise SystemExit("nothing to benchmark: give --servers or --endpoint")

        chats = make_chats(args.requests, args.seed)
        summaries, by_server = [], {}
        for name, url in endpoints.items():
            model_name = served_name(url)
            asyncio.run(run_load(url, model_name, chats[:2], math.inf, 1, args.seed, args.timeout))  # warm up
            for rate in rates:
                results, wall = asyncio.run(run_load(url, model_name, chats, rate, args.turns, args.seed, args.timeout))
                summaries.append(summarize(name, rate, results, wall))
                if rate == rates[0]:
                    by_server[name] = results
                errors = [r.error for r in results if r.error]
                if errors:
                    print(f"{name} @ {rate:g}/s: {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
        print(f"{args.requests} image chats x {args.turns} turn(s), greedy, answers of {ANSWER_LENGTHS} tokens at most; "
              f"model {model}")
        print(table(summaries))
        print(agreement(by_server))
        if args.json:
            Path(args.json).write_text(json.dumps(summaries, indent=2) + "\n")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
