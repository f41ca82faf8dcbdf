"""Quantized weights side by side (issue 28): decode speed, memory and logit drift against float weights.

    .venv/bin/python benchmarks/bench_quant.py                  # CPU: float32, bfloat16, int8, int8+head
    python benchmarks/bench_quant.py --device cuda              # GPU: bfloat16, fp8, transformers
    .venv/bin/python benchmarks/bench_quant.py --peers float32,int8 --layers 2 --json out.json
    .venv/bin/python benchmarks/bench_quant.py --kernels        # one linear layer of each kind, interleaved

The model: a preset's shape (default Pixtral-12B: dim 5120, FFN 14336, 32/8 heads, vocabulary
131072, its vision encoder) with random weights, each drawn in float32 from one seed, so every peer
rounds the same weights. On the CPU it keeps `--layers` decoder layers (default 4: 2.87B parameters,
11.5 GB in float32, the 131072 x 5120 embedding and head included): a decode step still reads GBs
of weights, as the whole model's does, and those bytes are what quantized weights cut. On the GPU,
the whole model.

Peers, each in its own process, one after the other (so each one's memory is its own):
  float32, bfloat16   our engine, float weights
  int8                the decoder's linears int8 (`Int8WeightLinear`: per-channel scales, the CPU
                      kernel `_weight_int8pack_mm`); embedding, head, norms, vision encoder and the
                      activations bfloat16 (the kernel is slower than float32 under float32 activations)
  int8+head           the same with the output head int8 too (`quantize_linears(..., output=True)`)
  int8-fp32           int8 linears under float32 activations (for the record; slow)
  fp8, fp8+head       float8 e4m3 (`Fp8Linear`: `torch._scaled_mm` with per-token activation scales
                      on fp8 GPUs; elsewhere dequantized at every call, not a CPU target), bfloat16 the rest
  transformers        Hugging Face transformers (`LlavaForConditionalGeneration`), bfloat16, same weights
A quantized peer is the float model after `pixtral.quant.quantize_linears`: the weights that
`load_model(..., quantization=...)` is to give when it quantizes while streaming a checkpoint (the
same per-weight rounding), built here without depending on it.

Measured for each (greedy, EOS ignored; our peers with the same engine settings and the prefix and
encoder caches cleared before every timed call; one warm-up, then the median of --repeats):
  - decode tokens/s at batch 1 and at batch B (CPU 8, GPU 64 chats): B (N - 1) / (t(N tokens) -
    t(1 token)), the prompts (35 tokens each) excluded; the output tokens/s end to end, B N / t(N);
    and the time to the first token, t(1 token): the prompts' prefill
  - weights: bytes of the parameters, and those a decode step reads (all but the embedding and the
    vision encoder), with the rate that batch-1 decoding reads them at
  - peak memory of the process: resident set (CPU) or what torch allocated on the GPU, while
    building the model, and (reset after the build) while serving: engine, KV cache, activations
  - quality against the reference, the first peer (CPU float32, GPU bfloat16): the logits of the
    first 8 prompts along the reference's greedy continuation (teacher-forced, its first 32
    tokens) -- max |difference|, that over the std of the reference's logits, how often the top
    token is the same -- and the greedy continuations of the batch-B run: the share of tokens
    before each one's first difference from the reference's.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, hf_from_ours, random_model, text_prompt, timed  # noqa: E402

from pixtral.engine import LLM  # noqa: E402
from pixtral.generation import SamplingParams  # noqa: E402
from pixtral.model.presets import preset  # noqa: E402
from pixtral.processing import load_processor  # noqa: E402
from pixtral.processing.loading import write_tokenizer_for  # noqa: E402
from pixtral.quant import quantize_linears  # noqa: E402


@dataclass(frozen=True)
class Peer:
    dtype: torch.dtype  # of the float weights and the activations
    scheme: str | None = None  # quantize_linears' scheme for the decoder's linears
    head: bool = False  # the output head quantized too
    transformers: bool = False


PEERS = {
    "float32": Peer(torch.float32),
    "bfloat16": Peer(torch.bfloat16),
    "int8": Peer(torch.bfloat16, "int8"),
    "int8+head": Peer(torch.bfloat16, "int8", head=True),
    "int8-fp32": Peer(torch.float32, "int8"),
    "fp8": Peer(torch.bfloat16, "fp8"),
    "fp8+head": Peer(torch.bfloat16, "fp8", head=True),
    "transformers": Peer(torch.bfloat16, transformers=True),
}
DEFAULTS = {  # device type: peers (the first is the reference), batch, new tokens
    "cpu": ("float32,bfloat16,int8,int8+head", 8, 24),
    "cuda": ("bfloat16,fp8,transformers", 64, 128),
}
QUALITY_PROMPTS, QUALITY_TOKENS = 8, 32  # teacher-forced logits compared: prompts x positions
NOT_READ_WHEN_DECODING = ("tok_embeddings", "embed_tokens", "vision", "multi_modal_projector", "patch_merger",
                          "pre_mm_projector_norm")


# ---------------------------------------------------------------------------- memory
def release_freed_memory(device: torch.device) -> None:
    """Give memory freed by the build back (to the driver; on the CPU, glibc's free lists to the system)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(device: torch.device) -> int | None:
    """Bytes: the GPU memory torch allocated, or the process's peak resident set (VmHWM), since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak at the present use; False where this cannot be done (then it runs on)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def weight_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes of all parameters, bytes of those a decode step reads: all but the embedding and vision)."""
    total = read = 0
    for name, p in module.named_parameters():
        size = p.numel() * p.element_size()
        total += size
        read += 0 if any(part in name for part in NOT_READ_WHEN_DECODING) else size
    return total, read


# ---------------------------------------------------------------------------- one peer
def engine_options(batch: int, prompt_len: int, new_tokens: int) -> dict:
    """The same for every peer of ours: room for exactly this workload (with a block of slack per
    sequence), so the KV cache costs every peer the same memory and no GPU profiling pass runs."""
    blocks_per_seq = -(-(prompt_len + new_tokens) // 16) + 1
    return {"max_num_seqs": batch, "num_blocks": batch * blocks_per_seq + 16, "block_size": 16}


def build(peer: Peer, args, device: torch.device):
    """(model, (weight bytes, decode bytes)): the peer's model, its float build freed."""
    model = random_model(args, device, peer.dtype, draw_in_float32=True)
    if peer.scheme:
        quantize_linears(model, peer.scheme, output=peer.head)
    if peer.transformers:
        model = hf_from_ours(model)  # a copy; ours is freed on return
    return model, weight_bytes(model)


def our_calls(model, processor, opts, prompt_len: int):
    """(generate(prompts, new) -> token lists, logits(ids) -> float32 [len, vocab]) on our engine."""
    llm = LLM.from_model(model, processor, **engine_options(opts.batch, prompt_len, opts.new_tokens))

    def generate(prompts, new):
        llm.engine.reset_prefix_cache()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        return [o.outputs[0].token_ids for o in outs]

    def logits(ids):
        return model(torch.tensor(ids))

    return generate, logits


def hf_calls(hf, device: torch.device):
    def generate(prompts, new):
        inputs = torch.tensor(prompts, device=device)  # equal lengths: no padding
        with torch.inference_mode():
            out = hf.generate(inputs, max_new_tokens=new, do_sample=False, pad_token_id=11)
        return out[:, inputs.shape[1]:].tolist()

    def logits(ids):
        return hf(input_ids=torch.tensor([ids], device=device)).logits[0].float()

    return generate, logits


def measure_decode(generate, prompts, n: int, repeats: int, device: torch.device) -> tuple[dict, list]:
    """Time to the first token, decode tokens/s and end-to-end output tokens/s at batch 1 and
    len(prompts); and the tokens of the last batch run."""
    out, last = {}, []

    def run(batch, new):
        last[:] = generate(prompts[:batch], new)

    for b in sorted({1, len(prompts)}):
        t1 = timed(lambda: run(b, 1), device, repeats)
        tn = timed(lambda: run(b, n), device, repeats)
        out[f"first_token_b{b}_s"] = t1  # the prompts' prefill and one step
        out[f"decode_b{b}_tok_s"] = b * (n - 1) / (tn - t1)
        out[f"e2e_b{b}_tok_s"] = b * n / tn
    return out, last


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_peer(opts, name: str, work: Path) -> dict:
    """Build, time and check one peer in this process; the first peer (`opts.reference`) also
    writes what the others are compared with."""
    peer, device = PEERS[name], torch.device(opts.device)
    args = model_args(opts)
    with tempfile.TemporaryDirectory() as tmp:
        processor = load_processor(write_tokenizer_for(args, Path(tmp) / "tekken.json"))
    prompts = [text_prompt(processor, opts.prompt_tokens, seed=s) for s in range(opts.batch)]
    started = time.perf_counter()
    model, (weights, read) = build(peer, args, device)
    release_freed_memory(device)
    build_peak = peak_memory(device)
    reset = reset_peak_memory(device)
    if peer.transformers:
        generate, logits = hf_calls(model, device)
    else:
        generate, logits = our_calls(model, processor, opts, len(prompts[0]))
    print(f"{name}: ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    result, tokens = measure_decode(generate, prompts, opts.new_tokens, opts.repeats, device)
    result.update(weight_bytes=weights, decode_read_bytes=read, build_peak_bytes=build_peak,
                  serving_peak_bytes=peak_memory(device) if reset else None)
    result["decode_b1_read_gb_s"] = read * result["decode_b1_tok_s"] / 1e9

    result.update(quality(logits, prompts, tokens, work / "reference.pt", name == opts.reference))
    return result


def quality(logits, prompts, tokens, reference_file: Path, is_reference: bool) -> dict:
    """Teacher-forced logits along the reference's continuations, and the free-running tokens,
    against the reference's; the reference itself writes its own (nothing to compare)."""
    if not is_reference and not reference_file.exists():
        return {}  # the reference failed: said in the report
    reference = {"tokens": tokens} if is_reference else torch.load(reference_file)
    ours = []
    with torch.inference_mode():
        for prompt, continuation in zip(prompts[:QUALITY_PROMPTS], reference["tokens"]):
            ids = prompt + continuation[:QUALITY_TOKENS]
            ours.append(logits(ids)[len(prompt) - 1: len(ids) - 1].float().cpu())  # those predicting the continuation
    ours = torch.stack(ours)
    if is_reference:
        torch.save({"tokens": tokens, "logits": ours}, reference_file)
        return {}
    ref, ref_tokens = reference["logits"], reference["tokens"]
    drift = (ours - ref).abs().max().item()
    return {"drift_max_abs": drift, "drift_max_rel": drift / ref.std().item(),
            "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "greedy_agreement": sum(map(common_prefix, tokens, ref_tokens)) / sum(map(len, ref_tokens)),
            "greedy_identical": sum(a == b for a, b in zip(tokens, ref_tokens))}


# ---------------------------------------------------------------------------- one layer alone
def kernel_table(repeats: int) -> None:
    """ms per call of one linear layer of the 12B shape, each kind timed in turn within every round
    (so a load that comes and goes on a shared machine touches every kind alike), median over rounds.
    Rows: the FFN's [14336, 5120] weight at 1 token (a batch-1 decode step), 8 (batch 8) and 35 (one
    prompt's prefill); the head's [131072, 5120] at 1 and 8."""
    from pixtral.quant import Int8WeightLinear

    print("| weight, tokens | float32 | bfloat16 | int8 (bf16 act.) | int8 (fp32 act.) |")
    print("|---|---|---|---|---|")
    for out_features in (14336, 131072):
        fp32 = torch.nn.Linear(5120, out_features, bias=False).requires_grad_(False)
        int8 = Int8WeightLinear.from_linear(fp32)
        kinds = [(fp32, torch.float32), (torch.nn.Linear(5120, out_features, bias=False, dtype=torch.bfloat16)
                                          .requires_grad_(False), torch.bfloat16),
                 (int8, torch.bfloat16), (int8, torch.float32)]
        for tokens in (1, 8, 35) if out_features == 14336 else (1, 8):  # a prefill needs the head's last row only
            times = [[] for _ in kinds]
            for _ in range(repeats + 1):  # the first round warms up
                for (module, dtype), kept in zip(kinds, times):
                    x = torch.randn(tokens, 5120, dtype=dtype)
                    start = time.perf_counter()
                    module(x)
                    kept.append(time.perf_counter() - start)
            cells = " | ".join(f"{1e3 * statistics.median(t[1:]):.1f}" for t in times)
            print(f"| [{out_features}, 5120], {tokens} | {cells} |", flush=True)
        del fp32, int8, kinds


# ---------------------------------------------------------------------------- the run
def model_args(opts):
    args = preset(opts.preset)
    return replace(args, n_layers=opts.layers) if opts.layers else args


ROWS = [  # key, label, format (values in bytes are shown in GB)
    ("decode_b1_tok_s", "decode tokens/s, batch 1", "{:.2f}"),
    ("decode_bB_tok_s", "decode tokens/s, batch {B}", "{:.2f}"),
    ("e2e_bB_tok_s", "output tokens/s end to end, batch {B}", "{:.2f}"),
    ("first_token_b1_s", "time to first token, batch 1 (s)", "{:.3f}"),
    ("first_token_bB_s", "time to first token, batch {B} (s)", "{:.3f}"),
    ("weight_bytes", "weights (GB)", "GB"),
    ("decode_read_bytes", "weights a decode step reads (GB)", "GB"),
    ("decode_b1_read_gb_s", "...read at batch 1 (GB/s)", "{:.1f}"),
    ("build_peak_bytes", "peak {memory} while building (GB)", "GB"),
    ("serving_peak_bytes", "peak {memory} while decoding (GB)", "GB"),
    ("drift_max_abs", "logit drift vs {ref}: max abs", "{:.4f}"),
    ("drift_max_rel", "logit drift vs {ref}: max abs / std", "{:.4f}"),
    ("top1_agreement", "top token = {ref}'s (teacher-forced)", "{:.1%}"),
    ("greedy_agreement", "greedy tokens before 1st difference", "{:.1%}"),
    ("greedy_identical", "greedy continuations identical (of {B})", "{}"),
]


def cell(result: dict, key: str, fmt: str, reference: bool) -> str:
    if "error" in result:
        return "failed"
    value = result.get(key)
    if value is None:
        return "(ref)" if reference and key in ("drift_max_abs", "drift_max_rel", "top1_agreement",
                                               "greedy_agreement", "greedy_identical") else "-"
    return f"{value / 1e9:.2f}" if fmt == "GB" else fmt.format(value)


def report(opts, results: dict) -> None:
    args = model_args(opts)
    b = opts.batch
    print(f"# Quantized weights: {describe_machine(torch.device(opts.device))}")
    print(f"{opts.preset} shape, {args.n_layers} decoder layers (dim {args.dim}, FFN {args.hidden_dim}, "
          f"{args.n_heads}/{args.n_kv_heads} heads, vocabulary {args.vocab_size}, vision encoder "
          f"{args.vision.num_hidden_layers if args.vision else 0} layers), random weights; prompts of "
          f"{opts.prompt_tokens + 3} tokens, {opts.new_tokens} new tokens, median of {opts.repeats}")
    print()
    names = list(results)
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    memory = "GPU memory" if opts.device.startswith("cuda") else "RSS"
    for key, label, fmt in ROWS:
        if b == 1 and "bB" in key:
            continue  # the batch-1 row says it
        key = key.replace("bB", f"b{b}")
        label = label.format(B=b, ref=opts.reference, memory=memory)
        print(f"| {label} | " + " | ".join(cell(results[n], key, fmt, n == opts.reference) for n in names) + " |")
    for name, r in results.items():
        if "error" in r:
            print(f"{name}: {r['error']}")


def child_command(opts, name: str, work: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--peer", name, "--work", str(work),
            "--device", opts.device, "--preset", opts.preset, "--layers", str(opts.layers or 0),
            "--batch", str(opts.batch), "--new-tokens", str(opts.new_tokens), "--prompt-tokens",
            str(opts.prompt_tokens), "--repeats", str(opts.repeats), "--peers", ",".join(opts.peers)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--preset", default="pixtral-12b-2409")
    parser.add_argument("--layers", type=int, help="decoder layers (default: CPU 4, GPU the preset's; 0: the preset's)")
    parser.add_argument("--peers", help=f"comma-separated, the reference first, of: {', '.join(PEERS)} "
                                        f"(default: CPU {DEFAULTS['cpu'][0]}; GPU {DEFAULTS['cuda'][0]})")
    parser.add_argument("--batch", type=int, help="the larger decode batch (default: CPU 8, GPU 64)")
    parser.add_argument("--new-tokens", type=int, help="tokens per timed decode (default: CPU 24, GPU 128)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="random tokens in each prompt (+3 for the chat template)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--kernels", action="store_true",
                        help="CPU: only one linear layer of each kind, timed in turn in one process (a noisy machine's "
                             "fairer comparison of the kernels)")
    parser.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run this one peer, in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    device = torch.device(opts.device)
    peers, batch, new_tokens = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    opts.peers = (opts.peers or peers).split(",")
    opts.batch, opts.new_tokens = opts.batch or batch, opts.new_tokens or new_tokens
    if opts.layers is None and device.type == "cpu":
        opts.layers = 4
    opts.reference = opts.peers[0]
    unknown = [p for p in opts.peers if p not in PEERS]
    if unknown or opts.new_tokens < 2:
        parser.error(f"unknown peers {unknown}" if unknown else "--new-tokens must be at least 2")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA GPU")
    if opts.threads:
        torch.set_num_threads(opts.threads)

    if opts.kernels:
        print(f"# One linear layer, ms per call: {describe_machine(device)}; median of {opts.repeats}")
        kernel_table(opts.repeats)
        return 0
    if opts.peer:  # one peer, in its own process
        result = run_peer(opts, opts.peer, opts.work)
        (opts.work / f"{opts.peer}.json").write_text(json.dumps(result))
        return 0

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
        work = Path(tmp)
        for name in opts.peers:
            command = child_command(opts, name, work) + (["--threads", str(opts.threads)] if opts.threads else [])
            rc = subprocess.run(command).returncode  # its progress and errors go to our stderr
            out = work / f"{name}.json"
            results[name] = json.loads(out.read_text()) if rc == 0 and out.exists() else {"error": f"exit {rc}"}
            # Each peer's numbers as soon as they are known: a run cut short by a time limit keeps them.
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
            if opts.json:
                opts.json.write_text(json.dumps({
                    "device": describe_machine(device), "preset": opts.preset, "layers": model_args(opts).n_layers,
                    "batch": opts.batch, "new_tokens": opts.new_tokens, "prompt_tokens": opts.prompt_tokens,
                    "repeats": opts.repeats, "reference": opts.reference, "peers": results}, indent=2) + "\n")
    report(opts, results)
    return 0 if all("error" not in r for r in results.values()) else 1

if __name__ == "__main__":
    sys.exit(main())
