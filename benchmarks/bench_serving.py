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

`transformers serve` cannot serve this model here: it loads transformers' `PixtralProcessor`, which
requires torchvision, and no CPU build of torchvision is installable on this machine; when it exits
before it is ready, its last log lines are printed and the other servers go on. The default peer is
therefore `transformers-cb`: transformers' own continuous batching (`model.init_continuous_batching`,
requests streamed token by token through `register_result_handler`), run in this process on the
Hugging Face export (fp32, eval mode, greedy, EOS id 2). Its prompts are exactly the token ids our
server builds (`pixtral.processing.load_processor(...).encode_chat`), and its tokens are decoded with
the same processor. transformers' continuous batching cannot take images: its requests are token ids
only (`add_request(input_ids, ...)`; no pixel_values reach the model), so that peer only runs the
text-only workload: the same chats (questions, follow-ups, answer lengths) without the images. With
it among the servers, the image chats run on the peers that take images and the text-only chats on
every peer, ours included, each workload in its own table; `--text-only` runs only the text chats.
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from servers import NotReady, free_port, wait_ready
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(224, 224), (512, 384), (384, 768), (1024, 1024)]  # mixed: the model resizes each its own way
QUESTIONS = ["What is the title of this picture?", "Describe this picture.", "What is the largest value?",
             "List every label you can read."]
FOLLOW_UPS = ["And the smallest one?", "Which colours are used?", "Say that again in one sentence."]
ANSWER_LENGTHS = [16, 48, 128]
EOS_ID = 2
TEXT_ONLY_PEERS = {"transformers-cb"}  # peers that cannot take images


# ---------------------------------------------------------------------- workload
@dataclass
class Chat:
    index: int
    image: str  # data URI
    question: str
    follow_up: str
    max_tokens: int

    def first_turn(self) -> list[dict]:
        if not self.image:  # the text-only workload
            return [{"role": "user", "content": self.question}]
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": self.image}},
                                             {"type": "text", "text": self.question}]}]

    def second_turn(self, answer: str) -> list[dict]:
        return [*self.first_turn(), {"role": "assistant", "content": answer},
                {"role": "user", "content": self.follow_up}]


def make_chats(n: int, seed: int, text_only: bool = False) -> list[Chat]:
    """`text_only`: the same chats (same draws) without their images."""
    rng = random.Random(seed)
    sources = sorted((ROOT / "examples").glob("*.png"))
    images = {}
    for path in sources:
        for size in SIZES:
            buf = io.BytesIO()
            Image.open(path).convert("RGB").resize(size, Image.BICUBIC).save(buf, format="PNG")
            images[(path.name, size)] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    keys = sorted(images)
    chats = [Chat(i, images[rng.choice(keys)], rng.choice(QUESTIONS), rng.choice(FOLLOW_UPS),
                  rng.choice(ANSWER_LENGTHS)) for i in range(n)]
    if text_only:
        for chat in chats:
            chat.image = ""
    return chats


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

    def done(self) -> "Result":
        """Stamp the end unless set (an answer without any token has its first token there too)."""
        self.end = self.end or time.perf_counter()
        if self.first_token is None:
            self.first_token = self.end
        return self

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
        result.text = "".join(pieces)
        result.output_tokens = result.output_tokens or chunks  # a server without usage: one token a chunk
    except Exception as exc:  # noqa: BLE001 - recorded, and reported with the results
        result.error = f"{type(exc).__name__}: {exc}"
    return result.done()


async def run_chat(send, chat: Chat, turns: int, at: float) -> list[Result]:
    """`send(messages, max_tokens, result)`: one streamed request, filling in `result`."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    first = await send(chat.first_turn(), chat.max_tokens, Result(chat.index, 1, time.perf_counter()))
    results = [first]
    if turns > 1 and first.error is None:
        second = Result(chat.index, 2, time.perf_counter())
        results.append(await send(chat.second_turn(first.text), chat.max_tokens, second))
    return results


async def drive(send, chats: list[Chat], rate: float, turns: int, seed: int) -> tuple[list[Result], float]:
    """The chats arriving as a Poisson process at `rate` chats/s (inf: all at once), each with its follow-up."""
    rng = random.Random(seed)
    start, at, tasks = time.perf_counter(), time.perf_counter(), []
    for chat in chats:
        tasks.append(asyncio.create_task(run_chat(send, chat, turns, at)))
        if math.isfinite(rate):
            at += rng.expovariate(rate)
    results = [r for rs in await asyncio.gather(*tasks) for r in rs]
    return results, time.perf_counter() - start


async def run_load(url: str, model: str, chats: list[Chat], rate: float, turns: int, seed: int,
                   timeout: float) -> tuple[list[Result], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=timeout,
                                http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=1024)))

    async def send(messages, max_tokens, result):
        return await stream(client, model, messages, max_tokens, result)

    try:
        return await drive(send, chats, rate, turns, seed)
    finally:
        await client.close()


# ---------------------------------------------------------------------- transformers' continuous batching, in process
class TransformersCB:
    """transformers' own continuous batching on the Hugging Face export, in this process.

    Prompts are the token ids our server builds for the same messages, tokens come back streamed one
    step at a time (`streaming=True`, delivered on the event loop by `register_result_handler`), and
    are decoded with the same processor. Token ids only: transformers' continuous batching has no way
    to pass pixel_values, so a chat with an image is refused (recorded as an error)."""

    def __init__(self, hf_dir: Path, mistral_dir: Path, requests: int):
        import torch
        from transformers import AutoModelForImageTextToText, ContinuousBatchingConfig, GenerationConfig

        from pixtral.processing import load_processor

        self.processor = load_processor(mistral_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        generation = GenerationConfig(do_sample=False, max_new_tokens=max(ANSWER_LENGTHS), eos_token_id=EOS_ID)
        # Sized here: left to itself it sizes the cache from device memory, which takes ~30 s on the CPU.
        # A page holds 256 tokens: a chat (prompt, answer and follow-up) fits in two.
        config = ContinuousBatchingConfig(num_blocks=max(64, 4 * requests), max_batch_tokens=2048)
        self.manager = self.model.init_continuous_batching(generation_config=generation,
                                                           continuous_batching_config=config)
        self.manager.start()
        self._ids = iter(range(1 << 62))
        self._lock = threading.Lock()

    def close(self) -> None:
        self.manager.stop(block=True, timeout=60)

    async def send(self, messages: list[dict], max_tokens: int, result: Result, timeout: float) -> Result:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        try:
            ids, images = self.processor.encode_chat(messages)
            if images:
                raise ValueError("transformers' continuous batching takes token ids only, no images")
            with self._lock:
                request_id = f"bench-{next(self._ids)}"

            def on_output(out) -> None:  # on the event loop, once per step of this request
                if out.generated_tokens and result.first_token is None:
                    result.first_token = time.perf_counter()
                if out.is_finished() and not done.done():
                    done.set_result(out)

            self.manager.register_result_handler(request_id, on_output)
            if self.manager.add_request(ids, request_id=request_id, max_new_tokens=max_tokens, streaming=True,
                                        eos_token_id=EOS_ID) is None:
                raise RuntimeError("transformers' continuous batching refused the request")
            out = await asyncio.wait_for(done, timeout)
            result.end = time.perf_counter()
            if out.error:
                raise RuntimeError(out.error)
            result.output_tokens = len(out.generated_tokens)  # EOS included, as a server's usage counts it
            result.text = self.processor.decode(out.generated_tokens)
        except Exception as exc:  # noqa: BLE001 - recorded, and reported with the results
            result.error = f"{type(exc).__name__}: {exc}"
        return result.done()

    async def run_load(self, chats: list[Chat], rate: float, turns: int, seed: int,
                       timeout: float) -> tuple[list[Result], float]:
        async def send(messages, max_tokens, result):
            return await self.send(messages, max_tokens, result, timeout)

        return await drive(send, chats, rate, turns, seed)


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
def why_not_ready(name: str, log_path: Path, lines: int = 15) -> str:
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    reason = ""
    if "torchvision" in "\n".join(tail).lower():
        reason = (f"\nreason: {name} loads transformers' PixtralProcessor, which requires torchvision, and no "
                  "torchvision build is installed here; benchmark transformers-cb instead (transformers' "
                  "continuous batching in process)")
    return f"--- last lines of {log_path}:\n" + "\n".join(tail) + reason


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
    p.add_argument("--hf-model",
                   help="its Hugging Face export (written there when absent; default: in a temporary folder)")
    p.add_argument("--servers", default="pixtral,transformers-cb",
                   help="comma-separated: pixtral, transformers-cb (in process), transformers (`transformers "
                        "serve`; needs torchvision) (default pixtral,transformers-cb)")
    p.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                   help="a server already running (loopback), instead of or besides the ones started")
    p.add_argument("--rates", default="inf", help="arrival rates in chats/s, comma-separated; inf: all at once")
    p.add_argument("--requests", type=int, default=32, help="chats per rate (default 32)")
    p.add_argument("--turns", type=int, choices=(1, 2), default=2, help="2: a follow-up on the same image")
    p.add_argument("--text-only", action="store_true",
                   help="only the text-only chats (the image chats without their images), on every peer")
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
    hf_model = None
    endpoints: dict[str, str] = {}
    in_process: dict[str, TransformersCB] = {}
    procs: list[tuple[subprocess.Popen, object]] = []
    try:
        for name in filter(None, args.servers.split(",")):
            if name == "transformers-cb":
                in_process[name] = None  # loaded when its turn comes, so that it does not idle beside the others
                continue
            if name not in ("pixtral", "transformers"):
                raise SystemExit(f"--servers: unknown server {name!r} (pixtral, transformers-cb, transformers)")
            port, log_path = free_port(), workdir / f"{name}.log"
            log = open(log_path, "w")
            if name == "pixtral":
                proc = start_ours(model, port, log)
            else:
                hf_model = hf_model or hf_export(model, Path(args.hf_model or workdir / "hf"))
                proc = start_transformers(hf_model, port, log)
            procs.append((proc, log))
            url = f"http://127.0.0.1:{port}"
            try:
                wait_ready(url, proc, args.startup_timeout)
            except NotReady as exc:
                log.flush()
                print(f"{name}: {exc}; going on without it\n{why_not_ready(name, log_path)}", file=sys.stderr)
                continue
            endpoints[name] = url
        for spec in args.endpoint:
            name, _, url = spec.partition("=")
            endpoints[name] = url.rstrip("/")
        peers = [*endpoints, *in_process]
        if not peers:
            raise SystemExit("nothing to benchmark: give --servers or --endpoint")

        workloads = [("text-only", True)] if args.text_only else [("image", False)]
        if in_process and not args.text_only:
            workloads.append(("text-only", True))  # transformers-cb cannot take images: compare text chats too
        all_summaries = []
        for workload, text_only in workloads:
            chats = make_chats(args.requests, args.seed, text_only)
            names = [n for n in peers if text_only or n not in TEXT_ONLY_PEERS]
            if not names:
                continue
            summaries, by_server = [], {}
            for name in names:
                if name in in_process:
                    if in_process[name] is None:
                        hf_model = hf_model or hf_export(model, Path(args.hf_model or workdir / "hf"))
                        in_process[name] = TransformersCB(hf_model, model, args.requests)
                    peer = in_process[name]

                    def load(cs, rate, turns, peer=peer):
                        return asyncio.run(peer.run_load(cs, rate, turns, args.seed, args.timeout))
                else:
                    url = endpoints[name]
                    model_name = served_name(url)

                    def load(cs, rate, turns, url=url, model_name=model_name):
                        return asyncio.run(run_load(url, model_name, cs, rate, turns, args.seed, args.timeout))
                load(chats[:2], math.inf, 1)  # warm up
                for rate in rates:
                    results, wall = load(chats, rate, args.turns)
                    summaries.append(summarize(name, rate, results, wall))
                    if rate == rates[0]:
                        by_server[name] = results
                    errors = [r.error for r in results if r.error]
                    if errors:
                        print(f"{name} @ {rate:g}/s: {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
            kind = "text-only chats (no images)" if text_only else "image chats"
            print(f"{workload}: {args.requests} {kind} x {args.turns} turn(s), greedy, answers of {ANSWER_LENGTHS} "
                  f"tokens at most; model {model}")
            print(table(summaries))
            print(agreement(by_server))
            print()
            all_summaries += [{"workload": workload, **s} for s in summaries]
        if args.json:
            Path(args.json).write_text(json.dumps(all_summaries, indent=2) + "\n")
    finally:
        for peer in in_process.values():
            if peer is not None:
                peer.close()
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for _, log in procs:
            log.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
