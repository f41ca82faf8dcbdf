"""The training loop: packed samples, masked loss, AdamW + warmup-cosine, resumable checkpoints.

One optimizer step consumes `micro_batch_size * grad_accum * world_size` packed sequences
(the global batch). The loss is the sum of token losses over the whole global batch divided
by its number of target tokens, whatever the split across processes and micro-batches, so
1 process with accumulation and N processes give the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from pixtral.errors import CheckpointError, ConfigError
from pixtral.model.args import ModelArgs, VisionArgs
from pixtral.model.attention import PackedCausal
from pixtral.model.pixtral import Pixtral
from pixtral.model.presets import preset
from pixtral.train import distributed
from pixtral.train.config import TrainConfig, config_from_tree, resolve_init
from pixtral.train.data import Example, load_files, load_images
from pixtral.train.lora import LoRALinear, apply_lora, export_lora, merge_lora
from pixtral.train.metrics import MetricsLog, plot_losses
from pixtral.train.packing import PackedStream
from pixtral.train.zero_branches import skip_zero_branches

CHECKPOINT = "checkpoint.pt"


# ---------------------------------------------------------------------- model
class LossModel(nn.Module):
    """Pixtral + the masked next-token loss, as one forward (what DDP/FSDP wrap).

    Returns the cross-entropy summed over target tokens and the image-feature penalty
    (`optim.image_feature_l2`, training only); the optimizer minimises their sum, the logs
    report the cross-entropy.
    """

    def __init__(self, model: Pixtral, image_feature_l2: float = 0.0, encode_always: bool = False):
        super().__init__()
        self.model = model
        self.image_feature_l2 = image_feature_l2
        # Under FSDP each vision block gathers its weights as it runs, forward and backward: a rank
        # whose batch has no image must run the blocks too, or the ranks' collectives stop matching.
        self.encode_always = encode_always and model.args.vision is not None

    def forward(self, ids, images, seqlens, target_pos, targets):
        m = self.model
        features, anchor = None, None
        if images:
            features = m.encode_images(images)
        elif self.encode_always:
            p = m.args.vision.patch_size
            # Exactly 0, and it keeps the blocks in the backward pass (their gradients are reduced there).
            anchor = m.encode_images([torch.zeros(3, p, p, device=ids.device)]).sum() * 0
        h = m.embed(ids, features)
        hidden = m.hidden_states(h, PackedCausal(seqlens, device=ids.device))
        logits = m.logits(hidden[target_pos])  # only where there is a target: saves the vocab GEMM
        loss = F.cross_entropy(logits, targets, reduction="sum")
        if anchor is not None:
            loss = loss + anchor
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


def init_weights(model: Pixtral, centering_encoder: bool = False) -> None:
    """GPT-style init for training from scratch: N(0, 0.02), residual outputs scaled by depth;
    with `centering_encoder`, the vision encoder then starts as `init_centering_encoder`."""
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        s = std
        if name.endswith(("wo.weight", "w2.weight")):
            depth = model.args.n_layers if name.startswith("layers.") else model.args.vision.num_hidden_layers
            s = std / math.sqrt(2 * depth)
        nn.init.normal_(p, 0.0, s)
    if centering_encoder and model.args.vision is not None:
        init_centering_encoder(model.vision_encoder)


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
    `ln_pre(patch_conv(patch))`, a function of its own 16x16 pixels only (the first step of
    `init_centering_encoder`)."""
    for block in encoder.transformer.layers:
        block.attention.wo.weight.zero_()
        block.feed_forward.w2.weight.zero_()


def build_model(cfg: TrainConfig, out: Path, d: distributed.Dist):
    """(model on CPU in float32, processor, tokenizer file). From a preset, rank 0 writes the
    tokenizer into `out` and every rank reads it there: several nodes need a shared out_dir."""
    from pixtral.processing import Processor

    if not cfg.model.init.startswith("preset:"):
        with distributed.together(d, f"while loading {cfg.model.init}"):
            model, processor, tok = _load_checkpoint(cfg)
    else:
        args = model_args_from(cfg)
        model = Pixtral(args)
        init_weights(model, cfg.model.centering_encoder_init)
        tok = Path(cfg.model.tokenizer) if cfg.model.tokenizer else out / "tekken.json"
        with distributed.together(d, f"while writing {tok}"):
            if d.main and not cfg.model.tokenizer:
                _write_tokenizer(cfg, args, out, tok)
        with distributed.together(d, f"while reading {tok}"):
            processor = Processor.from_file(tok)
    if processor.vocab_size > model.args.vocab_size:
        raise ConfigError(f"{tok}: tokenizer has {processor.vocab_size} ids but the model only {model.args.vocab_size}")
    return model, processor, tok


def _write_tokenizer(cfg: TrainConfig, args: ModelArgs, out: Path, tok: Path) -> None:
    from pixtral.processing.loading import write_tokenizer_for
    from pixtral.train.tokenizer import write_small_tekken

    out.mkdir(parents=True, exist_ok=True)
    if cfg.model.tokenizer_ranks:
        write_small_tekken(cfg.model.tokenizer_ranks, tok, args.vision)
    else:
        write_tokenizer_for(args, tok)


def _load_checkpoint(cfg: TrainConfig):
    from pixtral.checkpoint import load_model
    from pixtral.processing import Processor, load_processor

    init = resolve_init(cfg.model.init)
    model = load_model(init, "cpu", torch.float32)
    model.requires_grad_(True)
    model.train()
    tok = Path(cfg.model.tokenizer) if cfg.model.tokenizer else Path(init) / "tekken.json"
    if not tok.is_file():  # a checkpoint without tekken.json: the matching shipped tokenizer
        return model, load_processor(init), None
    return model, Processor.from_file(tok), tok


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
    """Model and optimizer state, whole, on rank 0 (a collective under FSDP: every rank calls it)."""
    if d.enabled and cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    module = wrapped.module if hasattr(wrapped, "module") else wrapped
    return module.state_dict(), optimizer.state_dict()


def _model_state(wrapped: nn.Module, cfg: TrainConfig, d) -> dict:
    """The model's state, whole, on rank 0 (a collective under FSDP)."""
    if d.enabled and cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    module = wrapped.module if hasattr(wrapped, "module") else wrapped
    return module.state_dict()


def _load_state(wrapped: nn.Module, optimizer, model_sd, optim_sd, cfg: TrainConfig, d) -> None:
    if d.enabled and cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(wrapped, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    module = wrapped.module if hasattr(wrapped, "module") else wrapped
    module.load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


def _write_atomic(path: Path, obj) -> None:
    """Written to a temporary file and renamed: a kill at any moment leaves the old or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as exc:
        tmp.unlink(missing_ok=True)  # a full disk keeps what space it has
        cause = exc  # torch's zip writer reports a failed write as "unexpected pos": the OSError is its context
        while not isinstance(cause, OSError) and cause.__context__ is not None:
            cause = cause.__context__
        raise CheckpointError(f"{path}: cannot write it ({cause})") from exc
    os.replace(tmp, path)


@dataclass
class Best:
    """The lowest validation loss so far, its step, and the validations since (early stopping)."""
    step: int | None = None
    val_loss: float = math.inf
    since: int = 0
    committed: int | None = None  # the step whose best file the last checkpoint.pt names


def best_path(out: Path, step: int) -> Path:
    return out / f"best-{step}.pt"


def _prune_best(out: Path, keep: set) -> None:
    """Best files other than `keep`. Two may exist for a while: a resume goes back to the last
    checkpoint, and must find the best that checkpoint names, not one from the steps it redoes."""
    for path in out.glob("best-*.pt"):
        step = path.stem.removeprefix("best-")
        if step.isdigit() and int(step) not in keep:
            path.unlink()


@dataclass
class Run:
    """What a training run holds between steps (built by `_prepare`)."""
    cfg: TrainConfig
    d: distributed.Dist
    log: Callable
    out: Path
    model: Pixtral
    processor: object
    tok_file: Path | None
    train_set: list
    val_set: list
    stream: PackedStream
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    trainable_keys: list[str]  # state-dict keys of the trained parameters (what a best file keeps)
    autocast: object
    params: list = field(default_factory=list)  # the trained parameters as the optimizer holds them (FSDP2: shards)
    scheduler: object = None
    start: int = 0
    data_position: int = 0  # packed sequences consumed before step `start`
    best: Best = field(default_factory=Best)
    metrics: MetricsLog | None = None
    bar: object = None

    @property
    def validating(self) -> bool:
        return bool(self.cfg.eval_every and self.val_set)

    @property
    def global_batch(self) -> int:
        return self.cfg.micro_batch_size * self.cfg.grad_accum * self.d.world

    def position(self, step: int) -> int:
        """Index in the stream of step `step`'s first sequence (world size and batch may have changed on resume)."""
        return self.data_position + (step - self.start) * self.global_batch


def save_checkpoint(run: Run, step: int) -> None:
    d = run.d
    d.where = f"step {step}: saving the checkpoint"
    model_sd, optim_sd = _full_state(run.wrapped, run.optimizer, run.cfg, d)
    path = run.out / CHECKPOINT
    b = run.best
    with distributed.together(d, f"at step {step} while writing {path}"):
        if d.main:
            _write_atomic(path, {
                "step": step,
                "model": model_sd,
                "optimizer": optim_sd,
                "scheduler": run.scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                "data_position": run.position(step),
                "best": {"step": b.step, "val_loss": b.val_loss, "since": b.since},
                "config": run.cfg.model_dump(),
            })
            _prune_best(run.out, {b.step})
    b.committed = b.step


def _changed_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k in set(a) | set(b):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys |= _changed_keys(x, y, f"{prefix}{k}.")
        elif x != y:
            keys.add(f"{prefix}{k}")
    return keys


def _value(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


# What a resumed run cannot change: the model, what trains, and the order of the data. Everything
# else (learning rate and schedule, steps, batch size, number of processes, validation, saving)
# takes effect from the resumed step.
FIXED_ON_RESUME = ("model", "lora", "freeze", "data.train", "data.format", "data.seq_len", "seed")
FREE_ON_RESUME = ("lora.merge", "out_dir")


def _fixed(key: str) -> bool:
    if key in FREE_ON_RESUME:
        return False
    return any(key == f or key.startswith(f + ".") for f in FIXED_ON_RESUME)


# ---------------------------------------------------------------------- loop
def train(cfg: TrainConfig, resume: bool = False, log=print) -> Path:
    d = distributed.setup(cfg.device, cfg.dist_timeout_s)
    try:
        return _train(cfg, resume, d, log if d.main else (lambda *a, **k: None))
    except RuntimeError as exc:
        better = distributed.explain(exc, d)
        if better is None:
            raise
        raise better from exc
    finally:
        gc.collect()  # FSDP's modules hold the process group in reference cycles: free them before it goes
        distributed.teardown(d)


def _train(cfg: TrainConfig, resume: bool, d, log) -> Path:
    run = _prepare(cfg, resume, d, log)
    last = _loop(run)
    return _finish(run, last)


def _prepare(cfg: TrainConfig, resume: bool, d, log) -> Run:
    out = Path(cfg.out_dir)
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
    if not resume and ckpt_path.is_file():
        raise ConfigError(f"{out} already holds a run ({ckpt_path}); pass --resume to continue it or choose another out_dir")
    changed = _check_resumable(cfg, ckpt_path) if resume else []  # before anything in the run folder changes
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, processor, tok_file = build_model(cfg, out, d)
    trainable_keys = _make_trainable(model, cfg, log)
    train_set, val_set = _load_data(cfg, processor, d, log)
    stream = PackedStream([len(e) - 1 for e in train_set], cfg.data.seq_len, cfg.seed)
    log(f"{stream.sequences_per_epoch()} packed sequences of <= {cfg.data.seq_len} tokens per epoch")

    model.to(d.device)
    fsdp = d.enabled and cfg.parallel == "fsdp"
    wrapped = distributed.wrap(LossModel(model, cfg.optim.image_feature_l2, encode_always=fsdp), d, cfg.parallel)
    optimizer = torch.optim.AdamW(param_groups(wrapped, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps)
    run = Run(cfg, d, log, out, model, processor, tok_file, train_set, val_set, stream, wrapped, optimizer,
              trainable_keys, _autocast(cfg, d, log), [p for p in wrapped.parameters() if p.requires_grad])
    if resume:
        _resume(run, ckpt_path, changed)
    else:
        run.scheduler = _scheduler(optimizer, cfg, 0)
    with distributed.together(d, f"while writing {out / 'metrics.jsonl'}"):
        if d.main:
            run.metrics = MetricsLog(out / "metrics.jsonl", run.start if resume else None)
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    return run


def _make_trainable(model: Pixtral, cfg: TrainConfig, log) -> list[str]:
    """Freeze and add LoRA as configured; the state-dict keys of what trains."""
    freeze(model, cfg.freeze)
    if cfg.lora.enabled:
        wrapped_names = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets),
                                   cfg.lora.vision_encoder, cfg.lora.adapter)
        log(f"LoRA rank {cfg.lora.rank} on {len(wrapped_names)} linear layers")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ConfigError("config: nothing to train (everything is frozen)")
    skipped = skip_zero_branches(model)
    if skipped:
        log(f"vision encoder: {skipped} frozen residual branches are zero (they add nothing): not computed")
    n_train = sum(p.numel() for p in trainable.values())
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained")
    return [f"model.{n}" for n in trainable]  # as LossModel names them


def _load_data(cfg: TrainConfig, processor, d, log) -> tuple[list, list]:
    workers = cfg.data.workers or max(1, _cpu_count() // d.world)

    def load(paths, name):
        return load_files(paths, processor, cfg.data.seq_len + 1, cfg.data.format, cfg.data.on_error, log, name,
                          workers)

    with distributed.together(d, "while loading the data"):
        train_set = load(cfg.data.train, "train")
        val_set = load(cfg.data.val, "val") if cfg.data.val else []
    # A sample skipped on one rank only (a file or image that differs between nodes) would give the
    # ranks different streams and different numbers of validation batches.
    for key, examples in (("data.train", train_set), ("data.val", val_set)):
        distributed.check_same(d, key, f"{len(examples)} samples, {sum(len(e) for e in examples)} tokens",
                               [[len(e), e.n_targets, len(e.images)] for e in examples])
    return train_set, val_set


def _autocast(cfg: TrainConfig, d, log):
    on_gpu = d.device.type == "cuda"
    use_bf16 = cfg.bf16 if on_gpu else cfg.cpu_bf16
    if use_bf16 and not on_gpu and not cpu_has_native_bf16():
        log("warning: cpu_bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), and emulated bf16 "
            "autocast trains many times slower than float32; training in float32")
        use_bf16 = False
    return torch.autocast(d.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def _scheduler(optimizer, cfg: TrainConfig, start: int):
    """Warmup + cosine over `cfg.steps`, standing at step `start`: a resumed run follows the
    schedule of the config it was resumed with, from the learning rates in its param groups'
    `initial_lr`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg), last_epoch=start - 1)


def _resume(run: Run, ckpt_path: Path, changed: list[str]) -> None:
    """Continue from the checkpoint with the weights, optimizer moments, RNG and data position it
    holds, and the hyperparameters of the current config (see FIXED_ON_RESUME)."""
    cfg, d = run.cfg, run.d
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    start = state["step"]
    _load_state(run.wrapped, run.optimizer, state["model"], state["optimizer"], cfg, d)
    for group, fresh in zip(run.optimizer.param_groups, param_groups(run.wrapped, cfg)):
        group.update(initial_lr=fresh["lr"], weight_decay=fresh["weight_decay"], betas=tuple(cfg.optim.betas),
                     eps=cfg.optim.eps)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    run.start, run.data_position = start, state["data_position"]
    run.scheduler = _scheduler(run.optimizer, cfg, start)
    if "best" in state and "data.val" not in changed:
        run.best = Best(**state["best"], committed=state["best"]["step"])
    with distributed.together(d, f"while resuming from {ckpt_path}"):
        if d.main:
            _prune_best(run.out, {run.best.step})  # one from the steps about to be redone is stale
    run.log(f"resumed from {ckpt_path} at step {start}")
    if changed:
        old_tree, new_tree = _checkpoint_config(ckpt_path)[0].model_dump(), cfg.model_dump()
        run.log(f"changed since the checkpoint, in effect from step {start + 1}: "
                + ", ".join(f"{k} {_value(old_tree, k)!r} -> {_value(new_tree, k)!r}" for k in changed))
        if "data.val" in changed:
            run.log("data.val changed: the best validation loss so far is forgotten")


def _checkpoint_config(ckpt_path: Path) -> tuple[TrainConfig, int]:
    """The config (with defaults where it predates a key) and step of a checkpoint, without reading its tensors."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    return config_from_tree(state["config"], str(ckpt_path)), state["step"]


def _check_resumable(cfg: TrainConfig, ckpt_path: Path) -> list[str]:
    """The keys that differ from the checkpoint's config; refuses the ones a resume cannot change."""
    old, start = _checkpoint_config(ckpt_path)
    changed = sorted(k for k in _changed_keys(old.model_dump(), cfg.model_dump()) if k != "out_dir")  # runs may move
    fixed = [k for k in changed if _fixed(k)]
    if fixed:
        raise ConfigError(f"--resume: {', '.join(fixed)} differ from the config of {ckpt_path}; they define the model, "
                          "what trains or the data order, so a resumed run cannot change them: put them back, or "
                          "start a new run in another out_dir")
    if (old.optim.encoder_lr_scale != 1.0) != (cfg.optim.encoder_lr_scale != 1.0):
        raise ConfigError(f"--resume: optim.encoder_lr_scale {old.optim.encoder_lr_scale} -> "
                          f"{cfg.optim.encoder_lr_scale} changes how the optimizer groups the parameters of "
                          f"{ckpt_path}; keep it {'at' if old.optim.encoder_lr_scale == 1.0 else 'away from'} 1.0")
    if cfg.steps <= start:
        raise ConfigError(f"--resume: {ckpt_path} is at step {start} and steps is {cfg.steps}: nothing left to "
                          "train; raise steps (--set steps=N) to continue the run, or --export it")
    return changed


def _loop(run: Run) -> int:
    """Train from `run.start`; the step it stopped at (cfg.steps, or earlier by early stopping)."""
    cfg, d = run.cfg, run.d
    if d.main and cfg.progress:
        from tqdm import tqdm

        run.bar = tqdm(total=cfg.steps, initial=run.start, desc="train", unit="step", dynamic_ncols=True)
        run.log = run.bar.write  # log lines above the bar, not through it
    try:
        if run.validating and run.start == 0:
            record = {"step": 0}
            _check(run, 0, record)  # the baseline: with keep_best, fine-tuning must beat it
            _report(run, record)
        t0, tokens_seen = time.time(), 0
        for step in range(run.start, cfg.steps):
            record = _step(run, step)
            done = step + 1
            tokens_seen += record["tokens"]
            elapsed = time.time() - t0
            record.update(tokens_per_s=round(tokens_seen / max(elapsed, 1e-9), 1), elapsed_s=round(elapsed, 2))
            stop = run.validating and (done % cfg.eval_every == 0 or done == cfg.steps) and _check(run, done, record)
            _report(run, record, eta_s=elapsed / (done - run.start) * (cfg.steps - done))
            if stop and done < cfg.steps:
                run.log(f"early stop at step {done}: {run.best.since} validations without a new best "
                        f"(early_stop_after: {cfg.early_stop_after}); the best is step {run.best.step}")
                return done
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save_checkpoint(run, done)
        return cfg.steps
    finally:
        if run.bar is not None:
            run.bar.close()


def _step(run: Run, step: int) -> dict:
    """One optimizer step over the global batch; its metrics record."""
    cfg, d = run.cfg, run.d
    done = step + 1
    d.where = f"step {done}"
    per_rank = cfg.micro_batch_size * cfg.grad_accum
    first = run.position(step)
    seqs = [run.stream[first + j] for j in range(run.global_batch)]
    total_targets = sum(n_targets(run.train_set[i]) for s in seqs for i in s)
    step_tokens = sum(len(run.train_set[i]) - 1 for s in seqs for i in s)
    mine = seqs[d.rank * per_rank:(d.rank + 1) * per_rank]
    mb = cfg.micro_batch_size
    # Read (images included) before the first collective of the step, so a bad file on one rank
    # stops every rank here rather than leaving the others in the backward pass.
    with distributed.together(d, f"at step {done} while reading its batch"):
        batches = [make_batch([run.train_set[i] for s in mine[k * mb:(k + 1) * mb] for i in s], run.processor,
                              d.device) for k in range(cfg.grad_accum)]
    wrapped = run.wrapped
    loss_sum, penalty_sum = 0.0, 0.0
    for k, batch in enumerate(batches):
        last = k == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
        with sync:
            with run.autocast:
                loss, penalty = wrapped(*batch)
            # DDP/FSDP average gradients over processes; undo that to get the global mean.
            ((loss + penalty) * (d.world / total_targets)).backward()
        loss_sum += loss.item()
        penalty_sum += penalty.item()
    loss_sum, penalty_sum = distributed.all_sum(d, [loss_sum, penalty_sum])
    grad_norm = None
    if cfg.optim.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.optim.grad_clip))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    record = {"step": done, "loss": loss_sum / total_targets, "lr": lr, "tokens": step_tokens}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    if cfg.optim.image_feature_l2 > 0:
        record["image_feature_l2"] = penalty_sum / total_targets
    return record


def _check(run: Run, step: int, record: dict) -> bool:
    """Validate at `step` and keep the best; True when early stopping ends the run here."""
    run.d.where = f"step {step}: validation"
    val = validate(run.wrapped, run.val_set, run.processor, run.cfg, run.d, run.autocast)
    run.wrapped.train()
    record["val_loss"] = val
    best = run.best
    if val < best.val_loss:  # every rank has the same all-reduced value, so the same answer
        best.step, best.val_loss, best.since = step, val, 0
        record["best"] = True
        if run.cfg.keep_best:
            _save_best(run, step, val)
        return False
    best.since += 1
    return bool(run.cfg.early_stop_after) and best.since >= run.cfg.early_stop_after


def _save_best(run: Run, step: int, val: float) -> None:
    d = run.d
    d.where = f"step {step}: saving the best model"
    state = _model_state(run.wrapped, run.cfg, d)
    path = best_path(run.out, step)
    with distributed.together(d, f"at step {step} while writing {path}"):
        if d.main:
            weights = {k: state[k].detach().cpu() for k in run.trainable_keys}  # the frozen rest never changes
            _write_atomic(path, {"step": step, "val_loss": val, "model": weights})
            _prune_best(run.out, {step, run.best.committed})


def _report(run: Run, record: dict, eta_s: float | None = None) -> None:
    """metrics.jsonl, the log line, the loss plot and the progress bar (rank 0)."""
    cfg, done = run.cfg, record["step"]
    with distributed.together(run.d, f"at step {done} while writing {run.out / 'metrics.jsonl'}"):
        if not run.d.main:
            return
        run.metrics.write(record)
        val = f" val {record['val_loss']:.4f}{' (best)' if record.get('best') else ''}" if "val_loss" in record else ""
        if "loss" not in record:
            run.log(f"step {done}/{cfg.steps}{val} before training")
            return
        if run.bar is not None:
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if done % cfg.log_every == 0 or done == cfg.steps or val:
            run.log(f"step {done}/{cfg.steps} loss {record['loss']:.4f}{val} lr {record['lr']:.2e} "
                    f"{record['tokens_per_s']:.0f} tok/s eta {eta_s / 60:.1f} min")
            plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")


def _finish(run: Run, last: int) -> Path:
    """The resumable checkpoint at `last`, and final/: the best model, or the last."""
    d = run.d
    save_checkpoint(run, last)
    d.where = f"step {last}: saving the final model"
    model_sd = _model_state(run.wrapped, run.cfg, d)
    final = run.out / "final"
    with distributed.together(d, f"while writing {final}"):
        if d.main:
            model_sd, info = _final_choice(run, model_sd, last)
            save_final(model_sd, run.model.args, run.cfg, final, run.tok_file, run.log, info)
            run.log(f"{final} holds the model of step {info['step']} ({info['chosen']})")
            plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
    return final


def _final_choice(run: Run, model_sd: dict, last: int) -> tuple[dict, dict]:
    """The weights for final/ and what they are: the best step's (keep_best) or the last one's."""
    b = run.best
    if not run.cfg.keep_best or b.step is None:
        return model_sd, {"step": last, "chosen": "the last step"}
    info = {"step": b.step, "val_loss": b.val_loss, "chosen": "the lowest validation loss"}
    if b.step == last:
        return model_sd, info
    path = best_path(run.out, b.step)
    if not path.is_file():
        run.log(f"warning: {path} is missing (keep_best was off, or it was deleted): final/ holds the last step")
        return model_sd, {"step": last, "chosen": "the last step"}
    best = torch.load(path, map_location="cpu", weights_only=True)
    return {**model_sd, **best["model"]}, info


def validate(wrapped, val_set, processor, cfg: TrainConfig, d, autocast) -> float:
    """Loss per target token over the first `val_batches` packed validation sequences. Rank r
    takes sequences r, r + world, ...; every rank runs the same number of forward passes (one past
    the end repeats sequence 0 and drops its loss), since under FSDP a forward pass is a collective."""
    stream = PackedStream([len(e) - 1 for e in val_set], cfg.data.seq_len, cfg.seed, shuffle=False)
    n = min(cfg.val_batches, stream.sequences_per_epoch())
    mine = list(range(d.rank, n, d.world))
    rounds = -(-n // d.world)
    with distributed.together(d, f"while reading the validation batches ({d.where})"):
        batches = [make_batch([val_set[i] for i in stream[k]], processor, d.device)
                   for k in mine + [0] * (rounds - len(mine))]
    wrapped.eval()
    loss, count = 0.0, 0
    with torch.no_grad():
        for j, batch in enumerate(batches):
            with autocast:
                value = wrapped(*batch)[0].item()
            if j < len(mine):
                loss += value
                count += len(batch[4])
    loss, count = distributed.all_sum(d, [loss, count])
    return loss / max(count, 1)


def save_final(model_sd: dict, args: ModelArgs, cfg: TrainConfig, final: Path, tok_file, log,
               info: dict | None = None) -> None:
    """The trained model in both layouts (LoRA merged), LoRA adapters alone, and in export.json
    which step it is."""
    from pixtral.checkpoint import save_model

    model = Pixtral(args)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets), cfg.lora.vision_encoder, cfg.lora.adapter)
    model.load_state_dict({k.removeprefix("model."): v for k, v in model_sd.items()})
    dtype = getattr(torch, cfg.save_dtype)
    final.mkdir(parents=True, exist_ok=True)
    if info is not None:
        (final / "export.json").write_text(json.dumps(info, indent=2) + "\n")
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


def export_checkpoint(run_dir: str | Path, dst: str | Path) -> tuple[Path, int]:
    """Save the model of a run's latest resumable checkpoint (e.g. mid-training) in both layouts;
    (the folder, the step it holds)."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise ConfigError(f"{run_dir}: no {CHECKPOINT} to export (is it a training run's out_dir?)")
    state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    cfg = config_from_tree(state["config"], str(run_dir / CHECKPOINT))
    init = resolve_init(cfg.model.init)
    if init.startswith("preset:"):
        args = model_args_from(cfg)
    else:
        from pixtral.checkpoint import find_files, read_args

        args = read_args(find_files(init))
    tok = Path(cfg.model.tokenizer) if cfg.model.tokenizer else run_dir / "tekken.json"
    if not tok.is_file():
        tok = Path(init) / "tekken.json" if (Path(init) / "tekken.json").is_file() else None
    save_final(state["model"], args, cfg, Path(dst), tok, lambda *_: None,
               {"step": state["step"], "chosen": f"the latest checkpoint of {run_dir}"})
    return Path(dst), state["step"]
