"""Decode attention alone, one layer of NeMo 12B's shape: the Triton paged kernel vs gather + SDPA.

    python benchmarks/bench_decode_attention.py            # GPU
    TRITON_INTERPRET=1 python benchmarks/bench_decode_attention.py --device cpu --quick   # smoke run

Both run `DecodeAttention.attend` (the KV write included) as the CUDA-graph decode step does,
captured in a CUDA graph and replayed, over the same cache, block tables and queries; block
tables are padded to the graph bucket's width, contexts vary a little from row to row. Prints
the time per call, the bytes of real keys and values each call has to read, and the largest
difference between the two outputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine  # noqa: E402

from pixtral.engine.attention import DecodeAttention  # noqa: E402
from pixtral.engine.kv_cache import PagedKVCache  # noqa: E402
from pixtral.engine.triton_decode import available, num_splits  # noqa: E402
from pixtral.model.args import ModelArgs  # noqa: E402

CASES = [(1, 300), (1, 4200), (1, 32000), (16, 1200), (64, 1150), (256, 1150)]  # (rows, context)


def width_for(context: int, block: int) -> int:
    width = 16
    while width * block < context:
        width *= 2
    return width


def timed_call(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call: replayed from a CUDA graph on the GPU, plain calls on the CPU."""
    if device.type != "cuda":
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(), fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (10 * repeats)


def run_case(args: ModelArgs, rows: int, context: int, block: int, sm_count: int, device: torch.device,
             repeats: int, gen: torch.Generator) -> str:
    """One table row: both paths over the same cache, block tables and queries."""
    width = width_for(context, block)
    num_blocks = rows * width + 1
    cache = PagedKVCache(args, num_blocks, block, device, torch.bfloat16)
    cache.k.normal_()
    cache.v.normal_()
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0: the null block
    tables = perm[: rows * width].view(rows, width).to(device)
    lens = (context - torch.randint(0, min(64, context), (rows,), generator=gen)).to(device)
    positions = lens - 1
    slots = tables.gather(1, (positions // block)[:, None])[:, 0] * block + positions % block
    q = torch.randn(rows, args.n_heads, args.head_dim, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(rows, args.n_kv_heads, args.head_dim, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(rows, args.n_kv_heads, args.head_dim, generator=gen).to(device, torch.bfloat16)
    splits = num_splits(rows, args.n_kv_heads, width * block, sm_count)
    gather = DecodeAttention(cache, positions, slots, tables, lens)
    kernel = DecodeAttention(cache, positions, slots, tables, lens, triton_splits=splits)
    with torch.inference_mode():
        diff = (gather.attend(0, q, k, v).float() - kernel.attend(0, q, k, v).float()).abs().max().item()
        t_gather = timed_call(lambda: gather.attend(0, q, k, v), device, repeats)
        t_kernel = timed_call(lambda: kernel.attend(0, q, k, v), device, repeats)
    kv_mb = 2 * lens.sum().item() * args.n_kv_heads * args.head_dim * 2 / 1e6
    return (f"| {rows} x {context} | {kv_mb:.1f} | {1e6 * t_gather:.1f} | {1e6 * t_kernel:.1f} | "
            f"{t_gather / t_kernel:.2f}x | {splits} | {diff:.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small shapes and contexts (a smoke run)")
    ap.add_argument("--repeats", type=int, default=20)
    opts = ap.parse_args()
    device = torch.device(opts.device)
    if not available(device):
        sys.exit("the Triton kernel cannot run here: install triton (GPU), or set TRITON_INTERPRET=1 for the CPU")
    args = ModelArgs(dim=5120, n_layers=1, head_dim=128, hidden_dim=1, n_heads=32, n_kv_heads=8, vocab_size=1)
    cases = CASES
    if opts.quick:
        args = ModelArgs(dim=64, n_layers=1, head_dim=16, hidden_dim=1, n_heads=4, n_kv_heads=2, vocab_size=1)
        cases, opts.repeats = [(1, 40), (3, 150)], 2
    block = 16
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    print(f"# decode attention, one layer: {args.n_heads} query / {args.n_kv_heads} kv heads, head_dim "
          f"{args.head_dim}, bf16, blocks of {block}; {describe_machine(device)}")
    print("| rows x context | real KV read (MB) | gather + SDPA (us) | Triton kernel (us) | speed-up | splits | max diff |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for rows, context in cases:
        print(run_case(args, rows, context, block, sm_count, device, opts.repeats, gen), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # this case's cache is gone with run_case's frame


if __name__ == "__main__":
    main()
