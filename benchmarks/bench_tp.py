"""Tensor parallelism: the same random checkpoint on 1 rank and on N, side by side, one run.

    python benchmarks/bench_tp.py                                   # CPU: TP=1 vs TP=2 (gloo), tiny preset
    python benchmarks/bench_tp.py --device cuda --preset pixtral-12b-2409 --sizes 1,2,4,8

For each tensor-parallel size, with `LLM(path, tensor_parallel_size=N)` (greedy, EOS ignored,
prefix and encoder caches cleared before every timed call):
  - decode step time and tokens/s at batch 1 and at batch B:  B (T - 1) / (t(T tokens) - t(1 token))
  - time to first token of one chat with a 1024x1024 image (random pixels) and a short question
The CPU run shows what the ranks' communication costs per decode step (two all-reduces a layer,
one for the embeddings, one all-gather of the logits: gloo over loopback); on GPUs, what N cards
buy. Sizes beyond the GPUs present are skipped, with a note.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pixtral.engine import LLM, Prompt
from pixtral.generation import SamplingParams


def write_checkpoint(preset: str, out: Path, dtype: str) -> Path:
    subprocess.run([sys.executable, "-m", "pixtral.cli.main", "init", "--preset", preset, "--out", str(out),
                    "--dtype", dtype], check=True)
    return out


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() (one warm-up first); the engine's results are on the host when it returns."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def image_prompt(llm: LLM, seed: int) -> Prompt:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    ids, images = llm.processor.encode_chat([{"role": "user", "content": [
        {"type": "image", "image": Image.fromarray(pixels)}, {"type": "text", "text": "What is in this picture?"}]}])
    return Prompt(ids, images)


def measure(llm: LLM, batch: int, tokens: int, repeats: int) -> dict[str, float]:
    def run(n_prompts: int, new: int, prompt_of) -> None:
        llm.engine.reset_prefix_cache()
        llm.generate([prompt_of(i) for i in range(n_prompts)],
                     SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))

    def text(i: int) -> Prompt:
        return Prompt(llm.processor.encode_chat([{"role": "user", "content": f"Story number {i}, please."}])[0])

    out = {}
    for b in (1, batch):
        first = timed(lambda: run(b, 1, text), repeats)
        full = timed(lambda: run(b, tokens, text), repeats)
        step = (full - first) / (tokens - 1)
        out[f"decode_step_ms_b{b}"] = step * 1e3
        out[f"decode_tok_s_b{b}"] = b / step
    seeds = iter(range(10**6))
    out["ttft_image_ms"] = timed(lambda: run(1, 1, lambda i: image_prompt(llm, next(seeds))), repeats) * 1e3
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL; rank r on cuda:r)")
    p.add_argument("--preset", default="tiny", help="random checkpoint of this preset (pixtral init)")
    p.add_argument("--model", help="an existing checkpoint instead of a random one")
    p.add_argument("--sizes", default="1,2", help="tensor-parallel sizes, comma-separated (default 1,2)")
    p.add_argument("--batch", type=int, help="the larger decode batch (default: CPU 16, GPU 64)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per timed decode (default 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    batch = args.batch or (64 if gpu else 16)
    dtype = "bfloat16" if gpu else "float32"
    sizes = [int(s) for s in args.sizes.split(",")]
    available = torch.cuda.device_count() if gpu else None

    with tempfile.TemporaryDirectory(prefix="bench_tp_") as tmp:
        path = Path(args.model) if args.model else write_checkpoint(args.preset, Path(tmp) / "ckpt", dtype)
        results = {}
        for size in sizes:
            if gpu and size > available:
                print(f"TP={size}: skipped, this machine has {available} GPU(s)", file=sys.stderr)
                continue
            started = time.perf_counter()
            with LLM(path, args.device, dtype, tensor_parallel_size=size) as llm:
                print(f"TP={size}: ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
                results[size] = measure(llm, batch, args.tokens, args.repeats)
    torch_threads = torch.get_num_threads()
    print(f"{args.model or args.preset} (random weights), {args.device}, {dtype}; {args.tokens} tokens per timed "
          f"decode, median of {args.repeats}; torch threads in this process now {torch_threads}")
    names = [f"TP={s}" for s in results]
    rows = [("decode step ms, batch 1", "decode_step_ms_b1"), ("decode tokens/s, batch 1", "decode_tok_s_b1"),
            (f"decode step ms, batch {batch}", f"decode_step_ms_b{batch}"),
            (f"decode tokens/s, batch {batch}", f"decode_tok_s_b{batch}"),
            ("TTFT ms, 1024x1024 image", "ttft_image_ms")]
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, key in rows:
        print(f"| {label} | " + " | ".join(f"{r[key]:.1f}" for r in results.values()) + " |")
    if 1 in results and len(results) > 1:
        for size, r in results.items():
            if size != 1:
                extra = r["decode_step_ms_b1"] - results[1]["decode_step_ms_b1"]
                print(f"TP={size} costs {extra:+.2f} ms per decode step at batch 1 over TP=1")
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
