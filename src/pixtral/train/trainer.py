"""The training loop: packed samples, masked loss, AdamW + warmup-cosine, resumable checkpoints.

One optimizer step consumes `micro_batch_size * grad_accum * world_size` packed sequences
(the global batch). The loss is the sum of token losses over the whole global batch divided
by its number of target tokens, whatever the split across processes and micro-batches, so
1 process with accumulation and N processes give the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pixtral.errors import ConfigError
from pixtral.model.args import ModelArgs, VisionArgs, preset
from pixtral.model.attention import PackedCausal
from pixtral.model.pixtral import Pixtral
from pixtral.train import distributed
from pixtral.train.config import TrainConfig, to_dict
from pixtral.train.data import Example, load_files, load_images
from pixtral.train.lora import LoRALinear, apply_lora, export_lora, merge_lora
from pixtral.train.metrics import MetricsLog, plot_losses
from pixtral.train.packing import PackedStream

CHECKPOINT = "checkpoint.pt"


# ---------------------------------------------------------------------- model
class LossModel(nn.Module):
    """Pixtral + the masked next-token loss, as one forward (what DDP/FSDP wrap).

    Returns the cross-entropy summed over target tokens and the image-feature penalty
    (`optim.image_feature_l2`, training only); the optimizer minimises their sum, the logs
    report the cross-entropy.
    """

    def __init__(self, model: Pixtral, image_feature_l2: float = 0.0):
        super().__init__()
        self.model = model
        self.image_feature_l2 = image_feature_l2

    def forward(self, ids, images, seqlens, target_pos, targets):
        m = self.model
        features = m.encode_images(images) if images else None
        h = m.embed(ids, features)
        hidden = m.hidden_states(h, PackedCausal(seqlens, device=ids.device))
        logits = m.logits(hidden[target_pos])  # only where there is a target: saves the vocab GEMM
        loss = F.cross_entropy(logits, targets, reduction="sum")
        penalty = loss.new_zeros(())
        if self.training and self.image_feature_l2 > 0 and features is not None:
            # Per target token, like the loss: the mean square of the image features fed to the decoder.
            penalty = self.image_feature_l2 * len(targets) * features.float().pow(2).mean()
        return loss, penalty  # summed cross-entropy, and the regulariser (0 unless training with it)


def model_args_from(cfg: TrainConfig) -> ModelArgs:
    name = cfg.model.init.removeprefix("preset:")
    args = preset(name)
    over = dict(cfg.model.args)
    vision_over = over.pop("vision", None) or {}
    if cfg.model.tokenizer_ranks and "vocab_size" not in over:
        over["vocab_size"] = 1000 + cfg.model.tokenizer_ranks
    try:
        args = dataclasses.replace(args, **over)
        if vision_over:
            args.vision = dataclasses.replace(args.vision or VisionArgs(), **vision_over)
    except TypeError as exc:
        raise ConfigError(f"config: model.args: {exc}") from None
    args.validate("config model.args")
    return args


def init_weights(model: Pixtral, blank_patch_init: bool = False, centering_encoder: bool = False,
                 local_encoder: bool = False) -> None:
    """GPT-style init for training from scratch: N(0, 0.02), residual outputs scaled by depth.

    With `blank_patch_init`, each patch-embedding filter then loses its component along a blank
    white patch (as the image preprocessing normalises it), so a white background embeds to
    exactly zero. Otherwise every token of a mostly white image carries one shared vector, many
    times larger than what the drawing adds, and (our reading) each optimizer step on the adapter
    moves that shared vector by more than the glyphs differ. On a single-glyph reading task
    (name the one letter or digit drawn on a small white image), a 4-layer model with a frozen
    random encoder stayed at chance through 1400 steps without this; with it, and without the
    pre-projector RMSNorm (which scales the near-zero background tokens back up), it began to
    read at step 1000. On the full synthetic data it did not help (README, "The default model").
    """
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        s = std
        if name.endswith(("wo.weight", "w2.weight")):
            depth = model.args.n_layers if name.startswith("layers.") else model.args.vision.num_hidden_layers
            s = std / math.sqrt(2 * depth)
        nn.init.normal_(p, 0.0, s)
    if blank_patch_init and model.args.vision is not None:
        remove_blank_patch_component(model.vision_encoder.patch_conv.weight)
    if centering_encoder and model.args.vision is not None:
        init_centering_encoder(model.vision_encoder)
    if local_encoder and model.args.vision is not None:
        init_local_encoder(model.vision_encoder)


@torch.no_grad()
def init_centering_encoder(encoder) -> None:
    """Make the vision transformer compute `x - mean(x over the image)` for each patch token.

    Every residual branch starts at zero except the first layer's attention: zero queries and keys
    attend uniformly over the image (attention stays inside each image), and values `I` with
    output `-I` subtract the average. Its input is `ln_pre`'s output, whose tokens all have RMS 1,
    so the attention norm leaves them unchanged and the average is that of the tokens themselves.
    On a page that is mostly background, the background then embeds near zero and what is drawn
    stands out, instead of every token carrying one large shared vector.
    """
    init_local_encoder(encoder)  # every residual branch at zero, then the first attention averages
    first = encoder.transformer.layers[0].attention
    eye = torch.eye(first.wv.weight.shape[0], dtype=first.wv.weight.dtype)
    first.wq.weight.zero_()
    first.wk.weight.zero_()
    first.wv.weight.copy_(eye)
    first.wo.weight.copy_(-eye)


@torch.no_grad()
def init_local_encoder(encoder) -> None:
    """Start every residual branch of the vision transformer at zero: each patch token leaves it as
    `ln_pre(patch_conv(patch))`, a function of its own 16x16 pixels only.

    The centering start subtracts the image's mean token, and that mean moves with whatever else is
    drawn: a glyph on a page with a large coloured bar embeds differently from the same glyph on a
    white page. Here a glyph embeds the same in every image, wherever it is, and every white patch
    to one shared vector. Not with `blank_patch_init` (the config refuses it): a white patch would
    embed to rounding noise that `ln_pre` scales to full size, a different vector in bf16 than in
    float32.
    """
    for block in encoder.transformer.layers:
        block.attention.wo.weight.zero_()
        block.feed_forward.w2.weight.zero_()


@torch.no_grad()
def remove_blank_patch_component(weight: torch.Tensor) -> None:
    """Patch filters [D, C, p, p] made orthogonal to a white patch in normalised pixel space."""
    from mistral_common.tokens.tokenizers.image import DATASET_MEAN, DATASET_STD

    mean, std = torch.tensor(DATASET_MEAN), torch.tensor(DATASET_STD)
    white = ((1 - mean) / std)[:, None, None].expand(weight.shape[1:]).reshape(-1).to(weight)
    u = white / white.norm()
    flat = weight.view(weight.shape[0], -1)
    flat -= (flat @ u)[:, None] * u[None, :]


def build_model(cfg: TrainConfig, out: Path, main: bool):
    """(model on CPU in float32, processor, tokenizer file)."""
    from pixtral.checkpoint import load_model
    from pixtral.processing import Processor, load_processor
    from pixtral.processing.loading import write_tokenizer_for
    from pixtral.train.tokenizer import write_small_tekken

    init = cfg.model.init
    if init.startswith("preset:"):
        args = model_args_from(cfg)
        model = Pixtral(args)
        init_weights(model, cfg.model.blank_patch_init, cfg.model.centering_encoder_init,
                     cfg.model.local_encoder_init)
        tok = out / "tekken.json"
        if cfg.model.tokenizer:
            tok = Path(cfg.model.tokenizer)
        elif main:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.model.tokenizer_ranks:
                write_small_tekken(cfg.model.tokenizer_ranks, tok, args.vision)
            else:
                write_tokenizer_for(args, tok)
        _barrier()
    else:
        model = load_model(init, "cpu", torch.float32)
        model.requires_grad_(True)
        model.train()
        tok = Path(cfg.model.tokenizer) if cfg.model.tokenizer else Path(init) / "tekken.json"
        if not tok.is_file():  # a checkpoint without tekken.json: the matching shipped tokenizer
            processor = load_processor(init)
            return model, processor, None
    processor = Processor.from_file(tok)
    if processor.vocab_size > model.args.vocab_size:
        raise ConfigError(f"{tok}: tokenizer has {processor.vocab_size} ids but the model only {model.args.vocab_size}")
    return model, processor, tok


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively. On an x86 CPU without AVX512-BF16 or AMX bf16 is
    emulated: a training step of the default model took 6.0 s under autocast on an AVX2-only EPYC,
    against 0.35 s in float32 (`benchmarks/bench_cpu_bf16_training.py`). Native is necessary, not
    sufficient: 2x faster on a Zen 4, 2.4x slower on a Xeon with AMX. Other architectures are taken
    at their word."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [c for c in checks if c is not None]
    return not checks or any(c() for c in checks)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    except AttributeError:
        return os.cpu_count() or 1


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def freeze(model: Pixtral, parts: list[str]) -> None:
    groups = {
        "vision_encoder": ["vision_encoder", "pre_mm_projector_norm"],
        "adapter": ["vision_language_adapter", "patch_merger"],
        "decoder": ["tok_embeddings", "layers", "norm", "output"],
    }
    for part in parts:
        for name in groups[part]:
            if hasattr(model, name):
                getattr(model, name).requires_grad_(False)


def skip_zero_branches(model: Pixtral) -> int:
    """Mark the vision encoder's frozen residual branches whose output projection is all zeros
    (`init_local_encoder` and `init_centering_encoder` start them so, and a frozen encoder keeps
    them so) to be skipped: each adds exactly 0. Exact; a training step with the centering
    encoder frozen takes 5% less time (benchmarks/bench_frozen_encoder_step.py). A branch with
    LoRA, or with any parameter training, is left alone. Returns how many branches are skipped."""
    encoder = getattr(model, "vision_encoder", None)  # a text-only model has none
    if encoder is None:
        return 0
    count = 0
    for block in encoder.transformer.layers:
        for branch, out_proj, flag in ((block.attention, "wo", "skip_attention"),
                                       (block.feed_forward, "w2", "skip_feed_forward")):
            proj = getattr(branch, out_proj)
            frozen = not any(p.requires_grad for p in branch.parameters())
            skip = frozen and type(proj) is nn.Linear and proj.bias is None and not proj.weight.any()
            setattr(block, flag, bool(skip))
            count += bool(skip)
    return count


ENCODER_PREFIXES = ("vision_encoder.", "pre_mm_projector_norm.")
VISION_PREFIXES = ENCODER_PREFIXES + ("patch_merger.", "vision_language_adapter.")


def param_groups(wrapped: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Weight decay on matrices only; the vision path, and within it the encoder, may get its own
    learning rate. The decoder's groups come first (the logged lr is theirs), and the encoder gets
    groups of its own only when its scale differs, so runs saved before it existed still resume."""
    split_encoder = cfg.optim.encoder_lr_scale != 1.0
    scales = (1.0, cfg.optim.vision_lr_scale, cfg.optim.vision_lr_scale * cfg.optim.encoder_lr_scale)

    def part(name: str) -> int:  # 0 decoder, 1 vision path, 2 encoder (when split)
        if split_encoder and name.startswith(ENCODER_PREFIXES):
            return 2
        return 1 if name.startswith(VISION_PREFIXES) else 0

    groups: dict[tuple[int, bool], list] = {}
    for name, p in wrapped.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("module.").removeprefix("model.")
            groups.setdefault((part(name), p.dim() >= 2), []).append(p)
    return [{"params": ps, "weight_decay": cfg.optim.weight_decay if decay else 0.0, "lr": cfg.optim.lr * scales[k]}
            for (k, decay), ps in sorted(groups.items())]


# ---------------------------------------------------------------------- batches
def make_batch(examples: list[Example], processor, device):
    ids, seqlens, pos, targets, images, offset = [], [], [], [], [], 0
    for ex in examples:
        inputs = ex.ids[:-1]
        ids += inputs
        seqlens.append(len(inputs))
        for j, (tgt, on) in enumerate(zip(ex.ids[1:], ex.mask[1:])):
            if on:
                pos.append(offset + j)
                targets.append(tgt)
        offset += len(inputs)
        images += load_images(processor, ex)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return as_long(ids), [im.to(device) for im in images], seqlens, as_long(pos), as_long(targets)


def n_targets(ex: Example) -> int:
    return sum(ex.mask[1:])


def lr_lambda(cfg: TrainConfig):
    warm, total, floor = cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


# ---------------------------------------------------------------------- state
def _full_state(wrapped: nn.Module, optimizer, cfg: TrainConfig, d) -> tuple[dict, dict]:
    if d.enabled and cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    module = wrapped.module if hasattr(wrapped, "module") else wrapped
    return module.state_dict(), optimizer.state_dict()


def _load_state(wrapped: nn.Module, optimizer, model_sd, optim_sd, cfg: TrainConfig, d) -> None:
    if d.enabled and cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(wrapped, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    module = wrapped.module if hasattr(wrapped, "module") else wrapped
    module.load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


def save_checkpoint(path: Path, wrapped, optimizer, scheduler, step: int, cfg: TrainConfig, d) -> None:
    """Written to a temporary file and renamed: a kill at any moment leaves the old or the new one."""
    model_sd, optim_sd = _full_state(wrapped, optimizer, cfg, d)
    if d.main:
        state = {
            "step": step,
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "data_position": step * cfg.micro_batch_size * cfg.grad_accum * d.world,
            "config": to_dict(cfg),
        }
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    _barrier()


def _changed_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k in set(a) | set(b):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys |= _changed_keys(x, y, f"{prefix}{k}.")
        elif x != y:
            keys.add(f"{prefix}{k}")
    return keys


# ---------------------------------------------------------------------- loop
def train(cfg: TrainConfig, resume: bool = False, log=print) -> Path:
    d = distributed.setup(cfg.device)
    try:
        return _train(cfg, resume, d, log if d.main else (lambda *a, **k: None))
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, resume: bool, d, log) -> Path:
    out = Path(cfg.out_dir)
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
    if not resume and ckpt_path.is_file():
        raise ConfigError(f"{out} already holds a run ({ckpt_path}); pass --resume to continue it or choose another out_dir")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, processor, tok_file = build_model(cfg, out, d.main)
    freeze(model, cfg.freeze)
    if cfg.lora.enabled:
        wrapped_names = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets),
                                   cfg.lora.vision_encoder, cfg.lora.adapter)
        log(f"LoRA rank {cfg.lora.rank} on {len(wrapped_names)} linear layers")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("config: nothing to train (everything is frozen)")
    skipped = skip_zero_branches(model)
    if skipped:
        log(f"vision encoder: {skipped} frozen residual branches are zero (they add nothing): not computed")
    n_train = sum(p.numel() for p in trainable)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained")

    seq_len = cfg.data.seq_len
    workers = cfg.data.workers or max(1, _cpu_count() // d.world)
    train_set = load_files(cfg.data.train, processor, seq_len + 1, cfg.data.format, cfg.data.on_error, log, "train",
                           workers)
    val_set = (load_files(cfg.data.val, processor, seq_len + 1, cfg.data.format, cfg.data.on_error, log, "val",
                          workers) if cfg.data.val else [])
    stream = PackedStream([len(e) - 1 for e in train_set], seq_len, cfg.seed)
    log(f"{stream.sequences_per_epoch()} packed sequences of <= {seq_len} tokens per epoch")

    model.to(d.device)
    wrapped = distributed.wrap(LossModel(model, cfg.optim.image_feature_l2), d, cfg.parallel)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters
    optimizer = torch.optim.AdamW(param_groups(wrapped, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start = 0
    if resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _load_state(wrapped, optimizer, state["model"], state["optimizer"], cfg, d)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start = state["step"]
        changed = _changed_keys(state["config"], to_dict(cfg)) - {"progress", "log_every", "eval_every",
                                                                  "save_every", "val_batches"}
        if changed:
            log(f"warning: the config differs from the checkpoint's in {sorted(changed)}; "
                "losses will not match an uninterrupted run")
        log(f"resumed from {ckpt_path} at step {start}")
        del state
    metrics = MetricsLog(out / "metrics.jsonl", start if resume else None) if d.main else None

    per_rank = cfg.micro_batch_size * cfg.grad_accum
    global_batch = per_rank * d.world
    on_gpu = d.device.type == "cuda"
    use_bf16 = cfg.bf16 if on_gpu else cfg.cpu_bf16
    if use_bf16 and not on_gpu and not cpu_has_native_bf16():
        log("warning: cpu_bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), and emulated bf16 "
            "autocast trains many times slower than float32; training in float32")
        use_bf16 = False
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        log = bar.write  # log lines above the bar, not through it
    t0, tokens_seen = time.time(), 0
    wrapped.train()
    for step in range(start, cfg.steps):
        seqs = [stream[step * global_batch + j] for j in range(global_batch)]
        total_targets = sum(n_targets(train_set[i]) for s in seqs for i in s)
        step_tokens = sum(len(train_set[i]) - 1 for s in seqs for i in s)
        mine = seqs[d.rank * per_rank:(d.rank + 1) * per_rank]
        loss_sum, penalty_sum = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            group = [train_set[i] for s in mine[micro * cfg.micro_batch_size:(micro + 1) * cfg.micro_batch_size] for i in s]
            ids, images, seqlens, pos, targets = make_batch(group, processor, d.device)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            with sync:
                with autocast:
                    loss, penalty = wrapped(ids, images, seqlens, pos, targets)
                # DDP/FSDP average gradients over processes; undo that to get the global mean.
                ((loss + penalty) * (d.world / total_targets)).backward()
            loss_sum += loss.item()
            penalty_sum += penalty.item()
        loss_sum, penalty_sum = distributed.all_sum(d, [loss_sum, penalty_sum])
        loss_value = loss_sum / total_targets
        grad_norm = None
        if cfg.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        tokens_seen += step_tokens
        done = step + 1
        elapsed = time.time() - t0
        tps = tokens_seen / max(elapsed, 1e-9)
        record = {"step": done, "loss": loss_value, "lr": lr, "tokens": step_tokens, "tokens_per_s": round(tps, 1),
                  "elapsed_s": round(elapsed, 2)}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if cfg.optim.image_feature_l2 > 0:
            record["image_feature_l2"] = penalty_sum / total_targets
        if cfg.eval_every and val_set and (done % cfg.eval_every == 0 or done == cfg.steps):
            record["val_loss"] = validate(wrapped, val_set, processor, cfg, d, autocast)
            wrapped.train()
        if metrics:
            metrics.write(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:.0f}")
        if d.main and (done % cfg.log_every == 0 or done == cfg.steps or "val_loss" in record):
            eta = elapsed / (done - start) * (cfg.steps - done)
            val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
            log(f"step {done}/{cfg.steps} loss {loss_value:.4f}{val} lr {lr:.2e} {tps:.0f} tok/s eta {eta / 60:.1f} min")
            plot_losses(out / "metrics.jsonl", out / "loss.png")
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            save_checkpoint(ckpt_path, wrapped, optimizer, scheduler, done, cfg, d)
    if bar is not None:
        bar.close()
    save_checkpoint(ckpt_path, wrapped, optimizer, scheduler, cfg.steps, cfg, d)
    final = out / "final"
    model_sd, _ = _full_state(wrapped, optimizer, cfg, d)
    if d.main:
        save_final(model_sd, model.args, cfg, final, tok_file, log)
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    _barrier()
    return final


def validate(wrapped, val_set, processor, cfg: TrainConfig, d, autocast) -> float:
    stream = PackedStream([len(e) - 1 for e in val_set], cfg.data.seq_len, cfg.seed, shuffle=False)
    n = min(cfg.val_batches, stream.sequences_per_epoch())
    wrapped.eval()
    loss, count = 0.0, 0
    with torch.no_grad():
        for k in range(d.rank, n, d.world):
            group = [val_set[i] for i in stream[k]]
            ids, images, seqlens, pos, targets = make_batch(group, processor, d.device)
            with autocast:
                loss += wrapped(ids, images, seqlens, pos, targets)[0].item()
            count += len(targets)
    loss, count = distributed.all_sum(d, [loss, count])
    return loss / max(count, 1)


def save_final(model_sd: dict, args: ModelArgs, cfg: TrainConfig, final: Path, tok_file, log) -> None:
    """The trained model in both layouts (LoRA merged), and LoRA adapters alone."""
    from pixtral.checkpoint import save_model

    model = Pixtral(args)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets), cfg.lora.vision_encoder, cfg.lora.adapter)
    model.load_state_dict({k.removeprefix("model."): v for k, v in model_sd.items()})
    dtype = getattr(torch, cfg.save_dtype)
    if cfg.lora.enabled:
        export_lora(model, final / "lora", cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets))
        log(f"saved LoRA adapters to {final / 'lora'}")
        if not cfg.lora.merge:
            return
        merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    save_model(model, final / "mistral", layout="mistral", tokenizer_file=tok_file, dtype=dtype, overwrite=True)
    try:
        save_model(model, final / "hf", layout="hf", tokenizer_file=tok_file, dtype=dtype, overwrite=True)
    except ConfigError as exc:  # an architecture transformers has no class for: the Mistral layout holds it
        log(f"saved the model to {final / 'mistral'} (Mistral layout); not in the Hugging Face layout: {exc}")
        return
    log(f"saved the model to {final / 'mistral'} (Mistral layout) and {final / 'hf'} (Hugging Face layout)")


def export_checkpoint(run_dir: str | Path, dst: str | Path) -> Path:
    """Save the model of a run's latest resumable checkpoint (e.g. mid-training) in both layouts."""
    from pixtral.train.config import _build

    run_dir = Path(run_dir)
    state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    cfg = _build(TrainConfig, state["config"], str(run_dir / CHECKPOINT))
    if cfg.model.init.startswith("preset:"):
        args = model_args_from(cfg)
    else:
        from pixtral.checkpoint import find_files, read_args

        args = read_args(find_files(cfg.model.init))
    tok = Path(cfg.model.tokenizer) if cfg.model.tokenizer else run_dir / "tekken.json"
    if not tok.is_file():
        tok = Path(cfg.model.init) / "tekken.json" if (Path(cfg.model.init) / "tekken.json").is_file() else None
    save_final(state["model"], args, cfg, Path(dst), tok, lambda *_: None)
    return Path(dst)
