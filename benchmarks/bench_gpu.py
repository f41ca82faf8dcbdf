"""GPU benchmark (H100 / H200): the Pixtral-12B shape with random bf16 weights, ours vs transformers.

    python benchmarks/bench_gpu.py                 # both, side by side (needs ~50 GB of GPU memory)
    python benchmarks/bench_gpu.py --skip-hf       # ours only
    python benchmarks/bench_gpu.py --quick         # fewer tokens and chats, for a smoke run
    python benchmarks/bench_gpu.py --profile prof.txt   # also where our time goes (torch.profiler tables)

Measured, for each implementation, on the same weights and inputs:
  - batch-1 decode tokens/s                        (N - 1) / (t(N tokens) - t(1 token))
  - time to first token: one 1024x1024 image + ~24 text tokens
  - vision encoder alone on that image
  - 16-way decode tokens/s                         16 (N - 1) / (t(N) - t(1))
  - 64 chats with one 512x512 image each, as one batch: prefill time (first token of all 64),
    decode tokens/s, and output tokens/s end to end
transformers runs `model.generate` (greedy, dynamic cache, SDPA). Ours runs `LLM.generate`
(paged KV cache, CUDA graphs for decode), with the prefix and encoder caches cleared before
every timed call. Targets (issue 5, H200): decode >= 160 tok/s, TTFT <= 160 ms, vision <= 7 ms,
64 image chats decode >= 5000 tok/s and >= 2000 output tok/s end to end.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, hf_from_ours, random_model, synchronize, text_prompt, timed  # noqa: E402

from pixtral.engine import LLM, Prompt  # noqa: E402
from pixtral.generation import SamplingParams  # noqa: E402
from pixtral.model.presets import preset  # noqa: E402
from pixtral.processing import load_processor  # noqa: E402
from pixtral.processing.loading import write_tokenizer_for  # noqa: E402


def image_prompt(processor, size: int, seed: int, question: str) -> Prompt:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    ids, images = processor.encode_chat([{"role": "user", "content": [
        {"type": "image", "image": Image.fromarray(pixels)}, {"type": "text", "text": question}]}])
    return Prompt(ids, images)


def run_hf(hf, prompts, device, n, reps) -> dict[str, float]:
    text, image, batch16, chats = prompts["text"], prompts["image"], prompts["batch16"], prompts["chats"]

    def generate(ids, new, images=None):
        kwargs = {}
        if images:
            kwargs = {"pixel_values": torch.stack(images).to(device, torch.bfloat16),
                      "image_sizes": torch.tensor([list(img.shape[1:]) for img in images], device=device)}
        inputs = torch.tensor(ids if isinstance(ids[0], list) else [ids], device=device)
        with torch.inference_mode():
            return hf.generate(inputs, max_new_tokens=new, do_sample=False, pad_token_id=11,
                               **kwargs)

    # The image is on the GPU before the clock starts, on both sides: the target is the encoder's time.
    pixels = image.images[0][None].to(device, torch.bfloat16)
    pixel_sizes = torch.tensor([list(image.images[0].shape[1:])], device=device)

    def vision():
        with torch.inference_mode():
            hf.model.get_image_features(pixel_values=pixels, image_sizes=pixel_sizes)

    chat_ids = [p.token_ids for p in chats]
    chat_images = [p.images[0] for p in chats]
    r = {}
    t1, tn = timed(lambda: generate(text, 1), device, reps), timed(lambda: generate(text, n), device, reps)
    r["decode_b1_tok_s"] = (n - 1) / (tn - t1)
    r["ttft_image_ms"] = 1000 * timed(lambda: generate(image.token_ids, 1, image.images), device, reps)
    r["vision_ms"] = 1000 * timed(vision, device, reps + 2)
    t1, tn = timed(lambda: generate(batch16, 1), device, reps), timed(lambda: generate(batch16, n), device, reps)
    r["decode_16way_tok_s"] = 16 * (n - 1) / (tn - t1)
    t1 = timed(lambda: generate(chat_ids, 1, chat_images), device, 1)
    tn = timed(lambda: generate(chat_ids, n, chat_images), device, 1)
    r["chats_prefill_s"] = t1
    r["chats_decode_tok_s"] = len(chats) * (n - 1) / (tn - t1)
    r["chats_e2e_tok_s"] = len(chats) * n / tn
    return r


def our_calls(llm, image: Prompt, device):
    """(generate(prompts, new_tokens), vision()) for our engine: caches cleared before each
    generate; the vision encoder alone on the image, already on the device."""

    def generate(ps, new):
        llm.engine.reset_prefix_cache()
        return llm.generate(ps, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))

    on_device = [img.to(device) for img in image.images]

    def vision():
        with torch.inference_mode():
            llm.model.encode_images(on_device)

    return generate, vision


def run_ours(llm, prompts, device, n, reps) -> dict[str, float]:
    text, image, batch16, chats = prompts["text"], prompts["image"], prompts["batch16"], prompts["chats"]
    generate, vision = our_calls(llm, image, device)
    r = {}
    t1, tn = timed(lambda: generate([text], 1), device, reps), timed(lambda: generate([text], n), device, reps)
    r["decode_b1_tok_s"] = (n - 1) / (tn - t1)
    r["ttft_image_ms"] = 1000 * timed(lambda: generate([image], 1), device, reps)
    r["vision_ms"] = 1000 * timed(vision, device, reps + 2)
    t1, tn = timed(lambda: generate(batch16, 1), device, reps), timed(lambda: generate(batch16, n), device, reps)
    r["decode_16way_tok_s"] = 16 * (n - 1) / (tn - t1)
    t1 = timed(lambda: generate(chats, 1), device, 1)
    tn = timed(lambda: generate(chats, n), device, 1)
    r["chats_prefill_s"] = t1
    r["chats_decode_tok_s"] = len(chats) * (n - 1) / (tn - t1)
    r["chats_e2e_tok_s"] = len(chats) * n / tn
    return r


def profile_ours(llm, prompts, device, path: Path) -> None:
    """torch.profiler tables for each of our timed cases: by device time, then by host (CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    text, image, chats = prompts["text"], prompts["image"], prompts["chats"]
    generate, vision = our_calls(llm, image, device)

    cases = {"batch-1 decode, 16 tokens": lambda: generate([text], 16),
             "TTFT, 1024x1024 image": lambda: generate([image], 1),
             "vision encoder, 1024x1024": vision,
             f"{len(chats)} image chats, 8 tokens": lambda: generate(chats, 8)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with path.open("w") as out:
        for name, fn in cases.items():
            fn()
            synchronize(device)
            with profile(activities=activities) as prof:
                fn()
                synchronize(device)
            averages = prof.key_averages()
            for sort in (("device_time_total", "cuda_time_total") if device.type == "cuda" else ()) + ("cpu_time_total",):
                try:
                    table = averages.table(sort_by=sort, row_limit=30, max_name_column_width=70)
                except (AttributeError, KeyError, ValueError):
                    continue
                out.write(f"## {name}: sorted by {sort}\n{table}\n\n")
                if sort != "cpu_time_total":
                    break  # one device-time table is enough
            out.flush()
    print(f"profile tables written to {path}")


ROWS = [  # key, label, lower is better, target
    ("decode_b1_tok_s", "batch-1 decode (tok/s)", False, 160),
    ("ttft_image_ms", "TTFT, 1024x1024 image + ~24 tokens (ms)", True, 160),
    ("vision_ms", "vision encoder, 1024x1024 (ms)", True, 7),
    ("decode_16way_tok_s", "16-way decode (tok/s)", False, None),
    ("chats_prefill_s", "64 image chats: prefill (s)", True, None),
    ("chats_decode_tok_s", "64 image chats: decode (tok/s)", False, 5000),
    ("chats_e2e_tok_s", "64 image chats: output tok/s end to end", False, 2000),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pixtral-12b-2409")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--no-triton", action="store_true", help="no Triton kernels: decode attention by gather + SDPA, eager norms/RoPE/SiLU")
    parser.add_argument("--no-fuse", action="store_true", help="separate q/k/v and gate/up matmuls")
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 8 chats, 1 repeat")
    parser.add_argument("--profile", type=Path, default=None, help="write torch.profiler tables of our cases here")
    parser.add_argument("--device", default="cuda", help="'cpu' only to smoke-test this script (--preset tiny --quick)")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU; see bench_cpu.py for the CPU benchmark")
    if opts.quick:
        opts.new_tokens, opts.chats, opts.repeats = 16, 8, 1
    n, reps = opts.new_tokens, opts.repeats

    args = preset(opts.preset)
    model = random_model(args, device, torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        processor = load_processor(write_tokenizer_for(args, Path(tmp) / "tekken.json"))
    prompts = {
        "text": text_prompt(processor, 32, seed=0),
        "image": image_prompt(processor, 1024, 0, "Describe this image in detail, please, with every object."),
        "batch16": [text_prompt(processor, 32, seed=s) for s in range(16)],
        "chats": [image_prompt(processor, 512, 100 + i, "What is in this image?") for i in range(opts.chats)],
    }
    image_text = sum(t not in (processor.image_token_ids or {}).values() for t in prompts["image"].token_ids)
    results: dict[str, dict[str, float]] = {}
    same = None
    if not opts.skip_hf:
        hf = hf_from_ours(model)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompts["text"]], device=device), max_new_tokens=8, do_sample=False,
                              pad_token_id=11)[0, len(prompts["text"]):].tolist()
        try:
            results["transformers"] = run_hf(hf, prompts, device, n, reps)
        except torch.cuda.OutOfMemoryError as exc:  # report ours anyway
            print(f"transformers ran out of memory: {exc}", flush=True)
        print(json.dumps({"transformers": results.get("transformers")}), flush=True)
        del hf
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    start = time.perf_counter()
    llm = LLM.from_model(model, processor, cuda_graphs=not opts.no_cuda_graphs, triton_kernels=not opts.no_triton,
                         fuse_projections=not opts.no_fuse)
    graphs = llm.engine.runner.graphs
    print(f"engine start: {time.perf_counter() - start:.1f} s ({len(graphs.graphs) if graphs else 0} CUDA graphs, "
          f"Triton decode attention: {bool(graphs and graphs.use_triton)}, fused kernels: {not opts.no_triton})",
          flush=True)
    if not opts.skip_hf:
        ours8 = llm.generate([prompts["text"]], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
        same = ours8 == ref[: len(ours8)]
    results["pixtral"] = run_ours(llm, prompts, device, n, reps)
    print(json.dumps({"pixtral": results["pixtral"]}), flush=True)

    print(f"# GPU benchmark: {describe_machine(device)}")
    options = [f for f, off in (("no CUDA graphs", opts.no_cuda_graphs), ("no Triton attention", opts.no_triton),
                                ("unfused projections", opts.no_fuse)) if off]
    print(f"ours: {', '.join(options) or 'default engine settings'}")
    print(f"{opts.preset} shape, random bf16 weights; {n} new tokens; image prompt {len(prompts['image'].token_ids)} "
          f"tokens ({image_text} text); {opts.chats} chats of {len(prompts['chats'][0].token_ids)} tokens; "
          f"KV cache {llm.engine.allocator.num_usable} blocks of {llm.engine.config.block_size}")
    if same is not None:
        print(f"same greedy tokens as transformers (8 tokens, bf16): {same}")
    names = list(results)
    print()
    print("| metric | " + " | ".join(names) + " | target |")
    print("|---|" + "---|" * len(names) + "---|")
    for key, label, _, target in ROWS:
        cells = [f"{results[name][key]:.{2 if key == 'chats_prefill_s' else 1}f}" for name in names]
        print(f"| {label} | " + " | ".join(cells) + f" | {target if target is not None else ''} |")
    print()
    print(json.dumps({"device": describe_machine(device), "same_greedy": same, **results}), flush=True)
    if opts.profile:
        profile_ours(llm, prompts, device, opts.profile)


if __name__ == "__main__":
    main()
