"""Serving benchmark in the manner of vLLM's `benchmark_serving`: image chats against OpenAI-compatible
servers, side by side, on the same requests.

    python benchmarks/bench_serving.py                                   # the default model, ours and transformers
    python benchmarks/bench_serving.py --random tiny --rates 2,inf --requests 16 --mixed-steps
    python benchmarks/bench_serving.py --model CKPT --rates 0.5,1,inf --requests 64
    python benchmarks/bench_serving.py --random pixtral-12b-2409 --device cuda ...   # the 12B shape on a GPU
    python benchmarks/bench_serving.py --endpoint NAME=URL ...           # servers already running

It starts `pixtral serve` on a checkpoint (the embedded default model, `--model CKPT`, or with
`--random PRESET` a random checkpoint of that preset written into the work folder: `tiny` has the real
131072-token vocabulary) and `transformers serve --continuous-batching` on the same weights, one
server after the other (each alone on the machine while it is measured, then stopped), and sends
each the same chats (images of mixed sizes, answers of mixed lengths, greedy) arriving as a Poisson
process at each rate (`inf`: all at once), each chat followed by a follow-up question on the same
image (`--turns 2`). It prints per server and rate: requests/s, output tokens/s, and p50/p90/p99 of
time to first token, time per output token and end-to-end latency, first turns and follow-ups apart.
Every request streams through the official `openai` client. Greedy answers of the servers are
compared request by request. Loopback only; bounded by --requests and --timeout.

`transformers serve` serves the text decoder only: it would load a LLaVA/Mistral3 checkpoint with
transformers' `PixtralProcessor`, which requires torchvision, and no CPU build of torchvision loads
here. The decoder is an ordinary `MistralForCausalLM` holding the same tensors, so it is exported
as one (hf_text_export.py: the Hugging Face export's language-model tensors renamed, its tokenizer
written by transformers' own tekken converter, which gives the prompt token ids our processor
builds) and `transformers serve` runs the text-only workload: the same chats (questions, follow-ups,
answer lengths) without the images. The image chats run on the peers that take images (ours) and
the text-only chats on every peer, ours included, each workload in its own table; `--text-only`
runs only the text chats. `transformers-cb` (`--servers pixtral,transformers-cb`) is transformers'
continuous batching in this process instead (no HTTP: it favours the peer), on the full export,
with the token ids our processor builds; it also takes no images.

`--mixed-steps` then measures, on each server, what a new request's prefill does to the requests
already decoding: `--mixed-streams` (16) streams with long answers decode; once every one streams
tokens (and has streamed 16 more), one request with a `--mixed-image-size` image arrives. It
reports the streams' p50 inter-token time before it arrived and between its arrival and its first
token (its prefill), and their ratio; also their mean and its ratio (steadier than the p50 when the
window holds only a few steps per stream, some of them ordinary decode steps while the request is
parsed and its image decoded). The text-only peers get a text
prompt of about the same number of tokens instead of the image (ours runs both, so the two are
comparable).

Default device: cpu, float32; with `--device cuda`, bfloat16 (`--dtype`); both servers get both.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
from servers import NotReady, free_port, wait_ready
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = [(224, 224), (512, 384), (384, 768), (1024, 1024)]  # mixed: the model resizes each its own way
QUESTIONS = ["What is the title of this picture?", "Describe this picture.", "What is the largest value?",
             "List every label you can read."]
FOLLOW_UPS = ["And the smallest one?", "Which colours are used?", "Say that again in one sentence."]
ANSWER_LENGTHS = [16, 48, 128]
EOS_ID = 2
TEXT_ONLY_PEERS = {"transformers", "transformers-cb"}  # peers that cannot take images
SERVERS = ("pixtral", "transformers", "transformers-cb")
WORDS = ("the light house keeper walked along the cold shore at night and counted every ship that passed "
         "while a storm rose over the grey sea near old harbour town").split()


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


def png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_chats(n: int, seed: int, text_only: bool = False, tag: str = "") -> list[Chat]:
    """`text_only`: the same chats (same draws) without their images.

    Every chat is its own: its question names it (`tag`-index) and its image carries that name in
    a corner, so no two chats of a run, of two rates or of the warm-up share more than the chat
    template's first tokens; prefix and encoder caches help only the follow-up turns, as in real
    traffic. The same `tag` gives the same chats: every server gets the same requests.
    """
    rng = random.Random(seed)
    sources = sorted((ROOT / "examples").glob("*.png"))
    bases = [(path, size) for path in sources for size in SIZES]
    chats = []
    for i in range(n):
        path, size = rng.choice(bases)
        name = f"{tag}-{i}" if tag else str(i)
        image = ""
        if not text_only:
            picture = Image.open(path).convert("RGB").resize(size, Image.BICUBIC)
            ImageDraw.Draw(picture).text((4, 4), f"#{name}", fill=(255, 0, 0))
            image = png_uri(picture)
        chats.append(Chat(i, image, f"Chat {name}: {rng.choice(QUESTIONS)}", rng.choice(FOLLOW_UPS),
                          rng.choice(ANSWER_LENGTHS)))
    return chats


def noise_image(side: int, seed: int) -> str:
    """A fresh image (random pixels): no server has it in an encoder or prefix cache."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return png_uri(Image.fromarray(pixels))


def text_of_tokens(processor, target: int, seed: int) -> str:
    """A user message whose chat prompt is about `target` tokens (our processor's count)."""
    rng = random.Random(seed)
    words = ["Read", "this:"]

    def count() -> int:
        return len(processor.encode_chat([{"role": "user", "content": " ".join(words)}])[0])

    while (n := count()) < target:
        words += [rng.choice(WORDS) for _ in range(max(1, (target - n) * 3 // 4))]
    return " ".join(words)


# ---------------------------------------------------------------------- one request
@dataclass
class Result:
    chat: int
    turn: int
    start: float
    first_token: float | None = None
    end: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    text: str = ""
    error: str | None = None
    times: list[float] | None = None  # arrival of every streamed piece, when asked for (mixed steps)
    stop: bool = False  # set by the caller: hang up at the next piece

    def done(self) -> "Result":
        """Stamp the end unless set (an answer without any token has its first token there too)."""
        self.end = self.end or time.perf_counter()
        if self.first_token is None:
            self.first_token = self.end
        return self

    def token(self, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
        if self.times is not None:
            self.times.append(now)

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
        try:
            async for chunk in response:
                if chunk.usage is not None:
                    result.output_tokens = chunk.usage.completion_tokens
                    result.prompt_tokens = chunk.usage.prompt_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    result.token(time.perf_counter())
                    pieces.append(chunk.choices[0].delta.content)
                    chunks += 1
                if result.stop:
                    break
        finally:
            await response.close()  # a hang-up: the server drops the request
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
    # No follow-up to an empty answer: an assistant turn without content is not a valid conversation
    # (mistral-common refuses it, and so does every server built on it).
    if turns > 1 and first.error is None and first.text:
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


# ---------------------------------------------------------------------- peers
class HTTPPeer:
    """An OpenAI-compatible server; `session()` gives a `send(messages, max_tokens, result)` on the running loop."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        self.model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

    @contextlib.asynccontextmanager
    async def session(self):
        client = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key="bench", max_retries=0, timeout=self.timeout,
            http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=1024)))

        async def send(messages, max_tokens, result):
            return await stream(client, self.model, messages, max_tokens, result)

        try:
            yield send
        finally:
            await client.close()

    def close(self) -> None:
        pass


class TransformersCB:
    """transformers' own continuous batching on the Hugging Face export, in this process.

    Prompts are the token ids our server builds for the same messages, tokens come back streamed one
    step at a time (`streaming=True`, delivered on the event loop by `register_result_handler`), and
    are decoded with the same processor. Token ids only: transformers' continuous batching has no way
    to pass pixel_values, so a chat with an image is refused (recorded as an error)."""

    def __init__(self, hf_dir: Path, mistral_dir: Path, requests: int, timeout: float, device: str, dtype: str):
        import torch
        from transformers import AutoModelForImageTextToText, ContinuousBatchingConfig, GenerationConfig

        from pixtral.processing import load_processor

        self.timeout = timeout
        self.processor = load_processor(mistral_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=getattr(torch, dtype),
                                                                 device_map=device).eval()
        generation = GenerationConfig(do_sample=False, max_new_tokens=max(ANSWER_LENGTHS), eos_token_id=EOS_ID)
        # Sized here: left to itself it sizes the cache from device memory, which takes ~30 s on the CPU.
        # A page holds 256 tokens: a chat (prompt, answer and follow-up) fits in two.
        config = (ContinuousBatchingConfig(num_blocks=max(256, 4 * requests), max_batch_tokens=2048)
                  if device == "cpu" else ContinuousBatchingConfig())
        self.manager = self.model.init_continuous_batching(generation_config=generation,
                                                           continuous_batching_config=config)
        self.manager.start()
        self._ids = iter(range(1 << 62))
        self._lock = threading.Lock()

    def close(self) -> None:
        self.manager.stop(block=True, timeout=60)

    @contextlib.asynccontextmanager
    async def session(self):
        yield self.send

    async def send(self, messages: list[dict], max_tokens: int, result: Result) -> Result:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        try:
            ids, images = self.processor.encode_chat(messages)
            if images:
                raise ValueError("transformers' continuous batching takes token ids only, no images")
            result.prompt_tokens = len(ids)
            with self._lock:
                request_id = f"bench-{next(self._ids)}"
            seen = [0]

            def on_output(out) -> None:  # on the event loop, once per step of this request
                if len(out.generated_tokens) > seen[0]:
                    seen[0] = len(out.generated_tokens)
                    result.token(time.perf_counter())
                if done.done():
                    return
                if result.stop and not out.is_finished():
                    self.manager.cancel_request(request_id)
                    done.set_result(out)
                elif out.is_finished():
                    done.set_result(out)

            self.manager.register_result_handler(request_id, on_output)
            if self.manager.add_request(ids, request_id=request_id, max_new_tokens=max_tokens, streaming=True,
                                        eos_token_id=EOS_ID) is None:
                raise RuntimeError("transformers' continuous batching refused the request")
            out = await asyncio.wait_for(done, self.timeout)
            result.end = time.perf_counter()
            if out.error:
                raise RuntimeError(out.error)
            result.output_tokens = len(out.generated_tokens)  # EOS included, as a server's usage counts it
            result.text = self.processor.decode(out.generated_tokens)
        except Exception as exc:  # noqa: BLE001 - recorded, and reported with the results
            result.error = f"{type(exc).__name__}: {exc}"
        return result.done()


def on_peer(peer, work):
    """Run `work(send)` (a coroutine function) on a fresh event loop against `peer`."""
    async def main():
        async with peer.session() as send:
            return await work(send)

    return asyncio.run(main())


# ---------------------------------------------------------------------- mixed steps
async def wait_until(condition, tasks, timeout: float, what: str) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if all(t.done() for t in tasks):
            raise RuntimeError(f"every stream ended before {what}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        await asyncio.sleep(0.005)


async def mixed_steps(send, streams: list[list[dict]], stream_tokens: int, arriving: list[dict],
                      settle: int, timeout: float) -> dict:
    """`streams` decode; once each has streamed `settle` tokens past its second, `arriving` is sent.
    Inter-token times of the streams before it (from the moment all have two tokens to its sending)
    against during its prefill (the gaps that start at or after its sending and end by its first token,
    plus half a step for the streams' tokens of that same step)."""
    results = [Result(i, 1, time.perf_counter(), times=[]) for i in range(len(streams))]
    tasks = [asyncio.create_task(send(m, stream_tokens, r)) for m, r in zip(streams, results)]
    new = Result(-1, 1, 0.0, times=[])
    try:
        await wait_until(lambda: all(len(r.times) >= 2 or r.end for r in results), tasks, timeout,
                         "two tokens on every stream")
        t0 = time.perf_counter()
        marks = [len(r.times) for r in results]
        await wait_until(lambda: all(len(r.times) >= m + settle or r.end for r, m in zip(results, marks)), tasks,
                         timeout, f"{settle} more tokens on every stream")
        new.start = time.perf_counter()
        await send(arriving, 1, new)
        t_send, t_first = new.start, new.first_token
        if new.error:
            raise RuntimeError(f"the arriving request failed: {new.error}")
        gaps = [list(zip(r.times, r.times[1:])) for r in results]
        before = [b - a for g in gaps for a, b in g if a >= t0 and b <= t_send]
        step = statistics.median(before) if before else 0.0
        await asyncio.sleep(max(3 * step, 0.05))  # the streams' tokens of the step that gave its first token
        gaps = [list(zip(r.times, r.times[1:])) for r in results]
        during = [b - a for g in gaps for a, b in g if a >= t_send and b <= t_first + step / 2]
        if not during:  # no stream token in the window at all: the gaps that span it
            during = [b - a for g in gaps for a, b in g if a < t_first and b > t_send]
    finally:
        for r in results:
            r.stop = True
        _, pending = await asyncio.wait(tasks, timeout=30)
        for t in pending:
            t.cancel()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} streams failed, first: {errors[0]}")
    live = sum(1 for r in results if r.times and r.times[-1] > t_first)
    p_before = statistics.median(before) if before else math.nan
    p_during = statistics.median(during) if during else math.nan
    return {"prompt_tokens": new.prompt_tokens, "ttft_ms": (t_first - t_send) * 1e3, "streams": live,
            "itl_before_p50_ms": p_before * 1e3, "itl_during_p50_ms": p_during * 1e3,
            "itl_before_mean_ms": statistics.fmean(before) * 1e3 if before else math.nan,
            "itl_during_mean_ms": statistics.fmean(during) * 1e3 if during else math.nan,
            "itl_during_max_ms": max(during) * 1e3 if during else math.nan,
            "gaps_before": len(before), "gaps_during": len(during),
            "slowdown": p_during / p_before if p_before > 0 else math.nan,
            "slowdown_mean": statistics.fmean(during) / statistics.fmean(before) if before and during else math.nan}


MIXED_ROWS = [("arriving request: prompt tokens", "prompt_tokens"), ("its time to first token ms", "ttft_ms"),
              ("streams decoding through it", "streams"),
              ("stream inter-token p50 ms, before it", "itl_before_p50_ms"),
              ("stream inter-token p50 ms, during its prefill", "itl_during_p50_ms"),
              ("stream inter-token mean ms, before it", "itl_before_mean_ms"),
              ("stream inter-token mean ms, during its prefill", "itl_during_mean_ms"),
              ("stream inter-token max ms, during its prefill", "itl_during_max_ms"),
              ("stream gaps measured, before / during", "gaps"), ("slowdown (p50 during / before)", "slowdown"),
              ("slowdown (mean during / before)", "slowdown_mean")]


def mixed_table(rows: list[dict]) -> str:
    names = [f"{r['server']}: {r['arriving']}" for r in rows]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    if any(r["streams"] == 0 for r in rows):
        lines.insert(0, "(-: the streams had ended before the request arrived; a model that stops early, such as the "
                        "default model, cannot show this: use --random)")
    for label, key in MIXED_ROWS:
        cells = []
        for r in rows:
            if key == "gaps":
                cells.append(f"{r['gaps_before']} / {r['gaps_during']}")
            elif isinstance(r[key], float) and math.isnan(r[key]):
                cells.append("-")  # nothing to measure: no stream was still decoding
            elif key.startswith("slowdown"):
                cells.append(f"{r[key]:.2f}x")
            elif isinstance(r[key], float):
                cells.append(f"{r[key]:.1f}")
            else:
                cells.append(str(r[key]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


# ---------------------------------------------------------------------- models
def is_hf_layout(model: Path) -> bool:
    return not (model / "params.json").is_file() and (model / "config.json").is_file()


def write_random(preset_name: str, out: Path, device: str, dtype: str) -> Path:
    """A random checkpoint of a preset in the Hugging Face layout (our server reads it as well), built on
    `device` (a 12B one in seconds on a GPU) and written tensor by tensor; reused when present."""
    if (out / "config.json").is_file():
        return out
    import gc

    import torch
    from common import random_model

    from pixtral.checkpoint import save_model
    from pixtral.model import preset
    from pixtral.processing.loading import write_tokenizer_for

    start = time.perf_counter()
    args = preset(preset_name)
    model = random_model(args, device, getattr(torch, dtype))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, out, layout="hf", tokenizer_file=write_tokenizer_for(args, Path(tmp) / "tekken.json"))
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"wrote a random {preset_name} checkpoint ({dtype}) to {out} in {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)
    return out


def hf_export(model: Path, out: Path) -> Path:
    if is_hf_layout(model):
        return model
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "pixtral.cli.main", "convert", str(model), str(out), "--to", "hf"],
                       check=True)
    return out


def text_export(hf_model: Path, out: Path, consume: bool = False) -> Path:
    if not (out / "config.json").is_file():
        from hf_text_export import export_text_decoder

        start = time.perf_counter()
        export_text_decoder(hf_model, out, consume)
        print(f"wrote the text decoder export {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
    return out


# ---------------------------------------------------------------------- servers
def log_tail(log_path: Path, lines: int = 15) -> str:
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last lines of {log_path}:\n" + "\n".join(tail)


def start_ours(model: Path, port: int, device: str, dtype: str, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pixtral.cli.main", "serve", "--model", str(model),
                             "--port", str(port), "--served-model-name", "bench", "--device", device,
                             "--dtype", dtype, "--max-num-seqs", "256", "--max-connections", "2048"],
                            stdout=log, stderr=subprocess.STDOUT)


def start_transformers(text_model: Path, port: int, device: str, dtype: str, requests: int, log) -> subprocess.Popen:
    # The `transformers` console script, run by this interpreter (wherever the script was installed).
    cli = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"
    cb = []
    if device == "cpu":
        # Sized here, as our server's CPU defaults (2048 tokens a step): left to itself it sizes the cache
        # from the machine's memory, which takes ~40 s on the CPU. A page holds 256 tokens.
        cb = ["--cb-num-blocks", str(max(256, 4 * requests)), "--cb-max-batch-tokens", "2048"]
    return subprocess.Popen([sys.executable, "-c", cli, "serve", "--continuous-batching", "--device", device,
                             "--dtype", dtype, *cb, "--host", "127.0.0.1", "--port", str(port), str(text_model)],
                            stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="checkpoint, either layout (default: the embedded default model)")
    which.add_argument("--random", metavar="PRESET",
                       help="a random checkpoint of this preset (tiny: the real 131072-token vocabulary), written "
                            "into the work folder in the Hugging Face layout, both servers on its weights")
    p.add_argument("--hf-model", help="the model's Hugging Face export (written there when absent; default: in "
                                      "the work folder), for transformers-cb and the text export")
    p.add_argument("--hf-text-model", help="the text decoder export that `transformers serve` runs (written there "
                                           "when absent; default: in the work folder)")
    p.add_argument("--workdir", help="where exports, random checkpoints and logs go (kept; default: a temporary "
                                     "folder, removed at the end)")
    p.add_argument("--servers", default="pixtral,transformers",
                   help="comma-separated, run in this order: pixtral, transformers (`transformers serve "
                        "--continuous-batching` on the text decoder), transformers-cb (transformers' continuous "
                        "batching in this process) (default pixtral,transformers)")
    p.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                   help="a server already running (loopback), besides the ones started (a NAME among "
                        f"{sorted(TEXT_ONLY_PEERS)} gets the text-only workload only)")
    p.add_argument("--device", default="cpu", help="both servers (default cpu; cuda on a GPU)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="both servers (default: float32 on the CPU, bfloat16 otherwise)")
    p.add_argument("--rates", default="inf", help="arrival rates in chats/s, comma-separated; inf: all at once")
    p.add_argument("--requests", type=int, default=32, help="chats per rate (default 32)")
    p.add_argument("--turns", type=int, choices=(1, 2), default=2, help="2: a follow-up on the same image")
    p.add_argument("--text-only", action="store_true",
                   help="only the text-only chats (the image chats without their images), on every peer")
    p.add_argument("--mixed-steps", action="store_true",
                   help="also: streams decoding while a new image request (text on text-only peers) arrives")
    p.add_argument("--mixed-streams", type=int, default=16, help="streams decoding (default 16)")
    p.add_argument("--mixed-stream-tokens", type=int, default=512,
                   help="answer length the streams ask for (default 512; they are hung up on once measured)")
    p.add_argument("--mixed-image-size", type=int, default=1024, help="side of the arriving image (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--json", help="write the summaries here")
    args = p.parse_args()
    if args.requests < 1 or args.mixed_streams < 1:
        raise SystemExit("--requests and --mixed-streams must be at least 1")
    rates = [math.inf if r.strip() == "inf" else float(r) for r in args.rates.split(",")]
    if any(not r > 0 for r in rates):
        raise SystemExit("--rates must be positive numbers or inf")
    names = list(dict.fromkeys(filter(None, args.servers.split(","))))
    for name in names:
        if name not in SERVERS:
            raise SystemExit(f"--servers: unknown server {name!r} ({', '.join(SERVERS)})")
    endpoints = {}
    for spec in args.endpoint:
        name, _, url = spec.partition("=")
        endpoints[name] = url.rstrip("/")
    peers = [*names, *(n for n in endpoints if n not in names)]
    if not peers:
        raise SystemExit("nothing to benchmark: give --servers or --endpoint")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    from pixtral.assets import default_model_dir
    from pixtral.processing import load_processor

    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_serving_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.random:
            model = write_random(args.random, workdir / f"random-{args.random}", args.device, dtype)
        else:
            model = Path(args.model) if args.model else default_model_dir()

        def hf_dir() -> Path:  # written when first needed
            return hf_export(model, Path(args.hf_model or workdir / "hf"))

        processor = load_processor(model)

        workloads = [("text-only", True)] if args.text_only else [("image", False)]
        if not args.text_only and any(n in TEXT_ONLY_PEERS for n in peers):
            workloads.append(("text-only", True))  # the text-only peers cannot take images: compare text chats
        # Fresh chats for the warm-up and for each rate (see make_chats), the same for every server.
        chats = {w: [make_chats(args.requests, args.seed, text_only, tag=f"r{k}") for k in range(len(rates))]
                 for w, text_only in workloads}
        warmups = {w: make_chats(2, args.seed + 1, text_only, tag="warmup") for w, text_only in workloads}
        summaries: dict[str, list[dict]] = {w: [] for w, _ in workloads}
        by_server: dict[str, dict[str, list[Result]]] = {w: {} for w, _ in workloads}
        mixed: list[dict] = []
        if args.mixed_steps:
            streams = [[{"role": "user", "content": f"Tell me a very long story about a lighthouse keeper; "
                                                    f"this is chapter {i + 1}."}] for i in range(args.mixed_streams)]
            image_msgs = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": noise_image(args.mixed_image_size, args.seed + 1)}},
                {"type": "text", "text": "Describe this picture in detail."}]}]
            target = len(processor.encode_chat(image_msgs)[0])
            text_msgs = [{"role": "user", "content": text_of_tokens(processor, target, args.seed + 2)}]

        def report() -> None:  # also after an interruption (SIGTERM from a time limit): what was measured
            all_summaries = []
            for workload, text_only in workloads:
                if not summaries[workload]:
                    continue
                kind = "text-only chats (no images)" if text_only else "image chats"
                print(f"{workload}: {args.requests} {kind} x {args.turns} turn(s), greedy, answers of "
                      f"{ANSWER_LENGTHS} tokens at most; model {model} ({args.device}, {dtype})")
                print(table(summaries[workload]))
                print(agreement(by_server[workload]))
                print()
                all_summaries += [{"workload": workload, **s} for s in summaries[workload]]
            if args.mixed_steps:
                side = args.mixed_image_size
                print(f"mixed steps: {args.mixed_streams} streams decoding (answers of up to "
                      f"{args.mixed_stream_tokens} tokens), then one request arrives: a {side}x{side} image "
                      f"(ours), or a text prompt of about as many tokens ('long text'; the text-only peers take no "
                      f"images); model {model} ({args.device}, {dtype})")
                if mixed:
                    print(mixed_table(mixed))
                else:
                    print("no measurement (see the errors above)")
                print()
                all_summaries += [{"workload": "mixed-steps", **m} for m in mixed]
            if args.json:
                Path(args.json).write_text(json.dumps(all_summaries, indent=2) + "\n")

        failed: list[str] = []
        try:
            for name in peers:
                proc = log = None
                peer = None
                try:
                    if name in endpoints:
                        peer = HTTPPeer(endpoints[name], args.timeout)
                    elif name == "transformers-cb":
                        peer = TransformersCB(hf_dir(), model, args.requests, args.timeout, args.device, dtype)
                    else:
                        port, log_path = free_port(), workdir / f"{name}.log"
                        if name == "transformers":
                            # A random checkpoint in our own work folder that no later server needs is
                            # consumed by the export, shard by shard: at 12B, two copies may not fit the disk.
                            later = peers[peers.index(name) + 1:]
                            consume = bool(args.random and own_workdir and not args.hf_model
                                           and not {"pixtral", "transformers-cb"} & set(later))
                            text_model = text_export(hf_dir(), Path(args.hf_text_model or workdir / "hf-text"), consume)
                        log = open(log_path, "w")
                        started = time.perf_counter()
                        proc = (start_ours(model, port, args.device, dtype, log) if name == "pixtral" else
                                start_transformers(text_model, port, args.device, dtype, args.requests, log))
                        url = f"http://127.0.0.1:{port}"
                        try:
                            wait_ready(url, proc, args.startup_timeout)
                        except NotReady as exc:
                            failed.append(name)
                            log.flush()
                            print(f"{name}: {exc}; going on without it\n{log_tail(log_path)}", file=sys.stderr)
                            continue
                        print(f"{name}: ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
                        peer = HTTPPeer(url, args.timeout)
                    for workload, text_only in workloads:
                        if not text_only and name in TEXT_ONLY_PEERS:
                            continue
                        warm = warmups[workload]
                        on_peer(peer, lambda send: drive(send, warm, math.inf, 1, args.seed))
                        for rate, cs in zip(rates, chats[workload]):
                            results, wall = on_peer(peer, lambda send: drive(send, cs, rate, args.turns, args.seed))
                            summaries[workload].append(summarize(name, rate, results, wall))
                            if rate == rates[0]:
                                by_server[workload][name] = results
                            errors = [r.error for r in results if r.error]
                            print(f"{name} @ {rate:g}/s, {workload}: {wall:.1f} s"
                                  + (f", {len(errors)} errors, first: {errors[0]}" if errors else ""),
                                  file=sys.stderr, flush=True)
                    if args.mixed_steps:
                        variants = [("long text", text_msgs)]
                        if name not in TEXT_ONLY_PEERS:
                            variants.insert(0, ("image", image_msgs))
                        for arriving, msgs in variants:
                            try:
                                row = on_peer(peer, lambda send: mixed_steps(send, streams, args.mixed_stream_tokens,
                                                                             msgs, 16, args.timeout))
                            except Exception as exc:  # noqa: BLE001 - reported, the others go on
                                failed.append(f"{name} (mixed steps)")
                                print(f"{name}: mixed steps ({arriving}) failed: {type(exc).__name__}: {exc}",
                                      file=sys.stderr, flush=True)
                                continue
                            mixed.append({"server": name, "arriving": arriving, **row})
                except Exception as exc:  # noqa: BLE001 - an export or a start that failed: the others go on
                    failed.append(name)
                    print(f"{name}: could not be measured: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                finally:
                    if peer is not None:
                        peer.close()
                    if proc is not None:
                        stop(proc)
                    if log is not None:
                        log.close()
        finally:
            report()
        if failed:
            print(f"not measured: {', '.join(failed)}", file=sys.stderr)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `timeout` (run_gpu_checks.sh) sends SIGTERM: stop the servers and remove the work folder on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
