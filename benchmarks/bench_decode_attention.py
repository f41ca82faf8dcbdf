"""Paged attention alone, one layer of NeMo 12B's shape: the Triton kernels vs gather + SDPA.

    python benchmarks/bench_decode_attention.py            # GPU: both tables
    python benchmarks/bench_decode_attention.py --cases mixed
    TRITON_INTERPRET=1 python benchmarks/bench_decode_attention.py --device cpu --quick   # smoke run

Decode table: both paths run `DecodeAttention.attend` (the KV write included) as the CUDA-graph
decode step does, captured in a CUDA graph and replayed, over the same cache, block tables and
queries; block tables are padded to the graph bucket's width, contexts vary a little from row to
row. Prints the time per call, the bytes of real keys and values each call has to read, and the
largest difference between the two outputs.

Mixed table: one step of many decode rows plus one prompt chunk (after a cached prefix or not),
the KV write included in each, eager calls (mixed steps are not graph-captured):
- per-sequence SDPA: `PagedAttention.attend_each`, one gather and one SDPA call per sequence;
- gather + masked SDPA: `PagedAttention.attend`, what the engine runs on the GPU today: the decode
  rows gathered to the longest context in one masked call, the chunk in its own causal call;
- the Triton varlen kernel (`triton_prefill.paged_varlen_attention`): the whole step, one launch.
The largest difference is the kernel's against per-sequence SDPA.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine  # noqa: E402

from pixtral.engine.attention import DecodeAttention, PagedAttention  # noqa: E402
from pixtral.engine.chunk import Chunk  # noqa: E402
from pixtral.engine.kv_cache import PagedKVCache  # noqa: E402
from pixtral.engine.triton_decode import available, num_splits  # noqa: E402
from pixtral.engine.triton_prefill import paged_varlen_attention  # noqa: E402
from pixtral.model.args import ModelArgs  # noqa: E402

CASES = [(1, 300), (1, 4200), (1, 32000), (16, 1200), (64, 1150), (256, 1150)]  # (rows, context)
# (decode rows, their context, prompt chunk length, the chunk's cached prefix)
MIXED_CASES = [(64, 2048, 512, 0), (64, 2048, 512, 1536), (16, 1200, 2048, 0), (256, 1150, 512, 0)]


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


def timed_eager(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of plain (not graph-captured) calls, after two warm-up calls."""
    fn(), fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def run_mixed_case(args: ModelArgs, decodes: int, context: int, chunk: int, prefix: int, block: int,
                   device: torch.device, repeats: int, gen: torch.Generator) -> str:
    """One row of the mixed table: the three paths over the same cache, block tables and step."""
    contexts = (context - torch.randint(0, min(64, context), (decodes,), generator=gen)).tolist() + [prefix + chunk]
    need = [-(-c // block) for c in contexts]
    num_blocks = sum(need) + 1
    cache = PagedKVCache(args, num_blocks, block, device, torch.bfloat16)
    cache.k.normal_()
    cache.v.normal_()
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0: the null block
    tables, used = [], 0
    for n in need:
        tables.append(perm[used: used + n])
        used += n
    chunks = [Chunk(c - 1, 1, t) for c, t in zip(contexts[:-1], tables)] + [Chunk(prefix, chunk, tables[-1])]
    table = torch.zeros(len(chunks), max(need), dtype=torch.int32)
    for row, t in enumerate(tables):
        table[row, : len(t)] = torch.tensor(t, dtype=torch.int32)
    lens = torch.tensor([c.length for c in chunks])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(device, torch.int32)
    table, context_lens = table.to(device), torch.tensor(contexts, dtype=torch.int32, device=device)
    tokens = int(lens.sum())
    q = torch.randn(tokens, args.n_heads, args.head_dim, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(tokens, args.n_kv_heads, args.head_dim, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(tokens, args.n_kv_heads, args.head_dim, generator=gen).to(device, torch.bfloat16)
    paged = PagedAttention(cache, chunks, device)

    def kernel():  # the same KV write as the other two, then one launch for the whole step
        k_flat, v_flat = cache.layer(0)
        k_flat.index_copy_(0, paged.slots, k)
        v_flat.index_copy_(0, paged.slots, v)
        return paged_varlen_attention(q, cache.k[0], cache.v[0], table, starts, context_lens, max_query_len=chunk)

    with torch.inference_mode():
        each = paged.attend_each(0, q, k, v)
        diff = (kernel().float() - each.float()).abs().max().item()
        t_each = timed_eager(lambda: paged.attend_each(0, q, k, v), device, repeats)
        t_gather = timed_eager(lambda: paged.attend(0, q, k, v), device, repeats)
        t_kernel = timed_eager(kernel, device, repeats)
    kv_mb = 2 * sum(contexts) * args.n_kv_heads * args.head_dim * 2 / 1e6
    step = f"{decodes} x {context} + {chunk}" + (f" after {prefix}" if prefix else "")
    return (f"| {step} | {kv_mb:.1f} | {1e6 * t_each:.1f} | {1e6 * t_gather:.1f} | {1e6 * t_kernel:.1f} | "
            f"{t_each / t_kernel:.2f}x | {t_gather / t_kernel:.2f}x | {diff:.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small shapes and contexts (a smoke run)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cases", choices=["decode", "mixed", "all"], default="all",
                    help="the decode table, the mixed-step table, or both")
    opts = ap.parse_args()
    device = torch.device(opts.device)
    if not available(device) or (device.type == "cuda" and not torch.cuda.is_available()):
        # A GPU benchmark: nothing to measure on this machine, which is not an error.
        print(f"skipped: the Triton kernels need a CUDA GPU (device {device}); for a smoke run on the CPU "
              "set TRITON_INTERPRET=1 and pass --device cpu --quick")
        return
    args = ModelArgs(dim=5120, n_layers=1, head_dim=128, hidden_dim=1, n_heads=32, n_kv_heads=8, vocab_size=1)
    cases, mixed_cases = CASES, MIXED_CASES
    if opts.quick:
        args = ModelArgs(dim=64, n_layers=1, head_dim=16, hidden_dim=1, n_heads=4, n_kv_heads=2, vocab_size=1)
        cases, mixed_cases, opts.repeats = [(1, 40), (3, 150)], [(3, 70, 40, 0), (2, 50, 30, 21)], 2
    block = 16
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    shape = (f"{args.n_heads} query / {args.n_kv_heads} kv heads, head_dim {args.head_dim}, bf16, blocks of {block}; "
             f"{describe_machine(device)}")
    gen = torch.Generator().manual_seed(0)
    if opts.cases in ("decode", "all"):
        print(f"# decode attention, one layer: {shape}")
        print("| rows x context | real KV read (MB) | gather + SDPA (us) | Triton kernel (us) | speed-up | splits "
              "| max diff |")
        print("|---|---|---|---|---|---|---|")
        for rows, context in cases:
            print(run_case(args, rows, context, block, sm_count, device, opts.repeats, gen), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # this case's cache is gone with run_case's frame
    if opts.cases in ("mixed", "all"):
        print(f"\n# mixed step (decode rows + one prompt chunk), one layer: {shape}")
        print("| decodes x context + chunk | real KV read (MB) | per-sequence SDPA (us) | gather + masked SDPA (us) "
              "| Triton varlen (us) | vs per-sequence | vs gather | max diff |")
        print("|---|---|---|---|---|---|---|---|")
        for decodes, context, chunk, prefix in mixed_cases:
            print(run_mixed_case(args, decodes, context, chunk, prefix, block, device, opts.repeats, gen), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
