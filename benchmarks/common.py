"""Shared by the benchmarks: random models, the same weights in Hugging Face transformers, timing.

The transformers model is built from our model's tensors (q/k rows permuted to HF's RoPE
layout by the checkpoint code's own functions), so both run identical weights; each benchmark
first checks that both pick the same greedy tokens.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from pixtral.checkpoint.configs import hf_config
from pixtral.checkpoint.layout import HF_CURRENT_TO_LEGACY, key_specs, to_hf_rows
from pixtral.model import Pixtral
from pixtral.model.args import ModelArgs


def random_model(args: ModelArgs, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
                 std: float = 0.02, draw_in_float32: bool = False) -> Pixtral:
    """Random weights (normal, std 0.02; norms 1), built on the meta device then filled in place.

    draw_in_float32: each weight drawn in float32, then rounded to `dtype`, so that models of any
    dtype hold the same weights (rounded) for a seed; by default each is drawn in `dtype` itself."""
    with torch.device("meta"):
        model = Pixtral(args)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif draw_in_float32:  # one float32 tensor at a time: never a float32 copy of the model
                p.copy_(torch.empty(p.shape, dtype=torch.float32, device=p.device).normal_(0.0, std, generator=gen))
            else:
                p.normal_(0.0, std, generator=gen)
    return model.eval().requires_grad_(False)


def hf_from_ours(model: Pixtral):
    """transformers' LLaVA/Mistral3 model holding the same weights as `model` (a copy)."""
    import transformers

    args = model.args
    config = hf_config(args)
    cls = {"llava": transformers.LlavaForConditionalGeneration,
           "mistral3": transformers.Mistral3ForConditionalGeneration}[config["model_type"]]
    config_cls = {"llava": transformers.LlavaConfig, "mistral3": transformers.Mistral3Config}[config["model_type"]]
    weight = model.tok_embeddings.weight
    hf_cfg = config_cls.from_dict(config)
    hf_cfg.text_config._attn_implementation = "sdpa"
    hf_cfg.vision_config._attn_implementation = "sdpa"
    with torch.device(weight.device):
        hf = cls._from_config(hf_cfg, dtype=weight.dtype, attn_implementation="sdpa")
    ours = dict(model.named_parameters())
    state = {}
    for spec in key_specs(args):
        tensor = ours[spec.mistral]
        if spec.permute_heads:
            tensor = to_hf_rows(tensor, spec.permute_heads, spec.head_dim)
        name = spec.hf
        for current, legacy in HF_CURRENT_TO_LEGACY:
            if name.startswith(legacy):
                name = current + name[len(legacy):]
                break
        state[name] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping to transformers failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # Our runs use ignore_eos (EOS is an ordinary token, generation runs to max_tokens); transformers
    # must neither stop at EOS nor ban it (as min_new_tokens would), or a trained model's greedy
    # continuations differ as soon as EOS is the top token.
    hf.generation_config.eos_token_id = None
    return hf.eval().requires_grad_(False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seconds_per_training_step(device: torch.device, batch_at: Callable[[int], tuple], steps: int,
                              frozen_encoder: bool, bf16: bool, skip_zero: bool = True) -> float:
    """The step of `pixtral train` on the embedded default model (forward, backward, gradient
    clipping, AdamW), timed over `steps` steps after one warm-up. `batch_at(k)` gives step k's batch
    (a `make_batch` tuple) and is called inside the timing: building batches there counts.

    frozen_encoder: the encoder as the recipe's frozen stages have it, the centering start
    (`model.centering_encoder_init`) frozen, whose zero branches the trainer skips (unless
    `skip_zero` is false)."""
    from pixtral.assets import DEFAULT_MODEL_DIR
    from pixtral.checkpoint import load_model
    from pixtral.train.trainer import LossModel, freeze, init_centering_encoder, skip_zero_branches

    torch.manual_seed(0)
    model = load_model(DEFAULT_MODEL_DIR, device, torch.float32).requires_grad_(True)
    if frozen_encoder:
        init_centering_encoder(model.vision_encoder)
        freeze(model, ["vision_encoder"])
        if skip_zero:
            skip_zero_branches(model)
    loss_model = LossModel(model, 1e-3).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for k in range(steps + 1):
        if k == 1:  # after the warm-up step
            synchronize(device)
            start = time.perf_counter()
        with autocast:
            loss, penalty = loss_model(*batch_at(k))
        (loss + penalty).backward()
        loss.item()  # the trainer logs every step's loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def write_training_data(out: Path, n: int, seed: int = 11, **synth) -> Path:
    """`n` synthetic grid-layout images with their conversations and documents under `out`, all in
    the training split (`synth` sets the other `SynthConfig` fields): the data every training
    benchmark times. Returns `out`."""
    from pixtral.data.synth import SynthConfig, write_dataset

    write_dataset(SynthConfig(out=out, n=n, seed=seed, val_frac=0.0, test_frac=0.0, layout="grid", **synth),
                  progress=False)
    return out


def packed_training_batches(count: int, **synth) -> list[tuple]:
    """`count` training batches (`make_batch` tuples, 1024 packed tokens each) of 300 synthetic
    grid-layout images (seed 11; `synth` sets the other `SynthConfig` fields), made beforehand so
    that a timing compares the model's step alone."""
    import tempfile

    from pixtral.assets import DEFAULT_MODEL_DIR
    from pixtral.processing import Processor
    from pixtral.train.data import load_jsonl
    from pixtral.train.packing import PackedStream
    from pixtral.train.trainer import make_batch

    processor = Processor.from_file(DEFAULT_MODEL_DIR / "tekken.json")
    with tempfile.TemporaryDirectory() as tmp:  # open throughout: make_batch reads the images
        data = write_training_data(Path(tmp) / "synth", 300, **synth)
        examples = []
        for name in ("train.jsonl", "pretrain.jsonl"):
            examples += load_jsonl(data / name, processor, 1025, log=lambda *_: None)[0]
        stream = PackedStream([len(e) - 1 for e in examples], 1024, 0)
        return [make_batch([examples[i] for i in stream[s]], processor, "cpu") for s in range(count)]


def describe_machine(device: torch.device) -> str:
    import transformers

    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    what = f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} torch threads"
                    break
        except OSError:
            pass
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{what}; torch {torch.__version__}, transformers {transformers.__version__}; {when}"


def text_prompt(processor, length: int, seed: int) -> list[int]:
    """[BOS][INST] <length random ordinary tokens> [/INST]: same length for every seed (no padding)."""
    gen = torch.Generator().manual_seed(seed)
    top = min(30000, processor.vocab_size)
    body = torch.randint(1000, top, (length,), generator=gen).tolist()  # ordinary tokens of any vocabulary
    ids = processor.encode_chat([{"role": "user", "content": "x"}])[0]
    inst_end = ids[-1]
    return ids[:2] + body + [inst_end]
