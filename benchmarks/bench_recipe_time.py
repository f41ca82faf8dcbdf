"""How long does `scripts/train_default_model.sh` take here? Its parts measured, then added up.

    .venv/bin/python benchmarks/bench_recipe_time.py [--device auto|cpu|cuda] [--steps 20] [--workers N]

On the device at hand it times the three things the recipe spends its time on:
  - writing synthetic images (`pixtral data synth --layout grid`, N worker processes),
  - encoding training examples, which every stage does first (mistral-common loads every image),
  - a training step of the default model: 1024 packed tokens, forward, backward, AdamW; with the
    vision encoder frozen (stage 1) and with everything training (stages 2-4), in bf16 autocast
    where the stage's config asks for it and the device has it, as `pixtral train` decides.
It then projects each stage from its config (configs/default_model_stage*.yaml: steps, files,
freeze, bf16) and the data sizes the script writes, and compares the total with the issue's
targets: 3 hours on a 2-core CPU, 10 minutes on one H100/H200. Not counted: the final evaluation
(about a minute) and the trainer's periodic checkpoints and validation (a few percent).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, seconds_per_training_step, write_training_data  # noqa: E402

from pixtral.assets import DEFAULT_MODEL_DIR  # noqa: E402
from pixtral.processing import Processor  # noqa: E402
from pixtral.train.config import load_config  # noqa: E402
from pixtral.train.data import load_jsonl  # noqa: E402
from pixtral.train.packing import PackedStream  # noqa: E402
from pixtral.train.trainer import cpu_has_native_bf16, make_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# What scripts/train_default_model.sh writes: images per `pixtral data synth` call, and lines per
# file the stage configs read (`head -n` files included).
IMAGES = {"runs/synth_default": 60000, "runs/synth_default_all": 60000, "runs/synth_default_weak": 40000,
          "runs/synth_default_scenes": 30000, "runs/synth_default_weak7": 20000,
          "runs/synth_default_tables8": 8000, "runs/synth_default_scenes9": 16000,
          "runs/synth_default_charts10": 10000, "runs/synth_grid_heldout": 1700}
LINES = {
    "runs/synth_default/train.jsonl": 54000, "runs/synth_default/val.jsonl": 3000,
    "runs/synth_default/pretrain.jsonl": 54000, "runs/synth_default/pretrain_lookup.jsonl": 54000,
    "runs/synth_default/pretrain_lookup_head30k.jsonl": 30000, "runs/synth_default/train_head15k.jsonl": 15000,
    "runs/synth_default_all/train.jsonl": 60000, "runs/synth_default_all/pretrain.jsonl": 60000,
    "runs/synth_default_all/pretrain_head30k.jsonl": 30000, "runs/synth_default_all/train_head15k.jsonl": 15000,
    "runs/synth_default_weak/train.jsonl": 40000, "runs/synth_default_weak/pretrain_head10k.jsonl": 10000,
    "runs/synth_default_scenes/train.jsonl": 30000, "runs/synth_default_weak7/train.jsonl": 20000,
    "runs/synth_default_tables8/train.jsonl": 8000, "runs/synth_default_scenes9/train.jsonl": 16000,
    "runs/synth_default_charts10/train.jsonl": 10000, "runs/synth_default_charts10/pretrain.jsonl": 10000,
}
TARGET_S = {"cpu": 3 * 3600, "cuda": 10 * 60}


def stage_configs():
    paths = sorted((REPO / "configs").glob("default_model_stage*.yaml"))
    if not paths:
        raise SystemExit(f"no configs/default_model_stage*.yaml under {REPO}")
    return [(p.stem.removeprefix("default_model_"), load_config(p)) for p in paths]


def time_synth(workers: int, n: int) -> float:
    """Seconds per image written by `pixtral data synth --layout grid --questions all`."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_training_data(Path(tmp) / "synth", n, seed=12, questions="all", documents="ranked", workers=workers)
        return (time.perf_counter() - start) / n


def time_steps(device: torch.device, steps: int, workers: int):
    """Seconds per encoded line, and seconds per training step for (frozen encoder, bf16) pairs."""
    processor = Processor.from_file(DEFAULT_MODEL_DIR / "tekken.json")
    bf16_options = [False]
    if device.type == "cuda" or cpu_has_native_bf16():
        bf16_options.append(True)
    per_step = {}
    with tempfile.TemporaryDirectory() as tmp:  # open throughout: each step reads its images, as in training
        data = write_training_data(Path(tmp) / "synth", 400, questions="all", documents="ranked")
        examples, lines = [], 0
        start = time.perf_counter()
        for name in ("train.jsonl", "pretrain.jsonl"):
            kept, report = load_jsonl(data / name, processor, 1025, log=lambda *_: None, workers=workers)
            examples += kept
            lines += report.kept + sum(report.skipped.values())
        per_line = (time.perf_counter() - start) / lines
        stream = PackedStream([len(e) - 1 for e in examples], 1024, 0)
        for frozen in (True, False):
            for bf16 in bf16_options:
                per_step[frozen, bf16] = seconds_per_training_step(
                    device, lambda k: make_batch([examples[i] for i in stream[k]], processor, device),
                    steps, frozen, bf16)
    return per_line, per_step


def fmt(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per setting (default 20)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes for writing and encoding data, as the script uses (default: one per core)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: one per core)")
    ap.add_argument("--images", type=int, default=2000, help="images written to time the data step (default 2000)")
    args = ap.parse_args(argv)
    for name in ("steps", "workers", "threads", "images"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    stages = stage_configs()
    unknown = sorted({f for _, cfg in stages for f in cfg.data.train + cfg.data.val} - set(LINES))
    if unknown:
        raise SystemExit(f"stage configs read files this benchmark has no size for: {unknown}; add them to LINES")

    per_image = time_synth(args.workers, args.images)
    per_line, per_step = time_steps(device, args.steps, args.workers)

    print(f"{describe_machine(device)}; data workers {args.workers}")
    print(f"measured: {1 / per_image:.0f} images/s written, {1 / per_line:.0f} lines/s encoded, seconds per "
          "training step: " + ", ".join(f"{'frozen encoder' if fr else 'all trained'}"
                                        f"{' bf16' if bf else ' fp32'} {t:.4f}" for (fr, bf), t in per_step.items()))
    print()
    print("| part | steps or items | projected |")
    print("|---|---|---|")
    images = sum(IMAGES.values())
    total = images * per_image
    print(f"| data synth ({len(IMAGES)} sets) | {images} images | {fmt(images * per_image)} |")
    for name, cfg in stages:
        bf16 = cfg.bf16 if device.type == "cuda" else cfg.cpu_bf16 and cpu_has_native_bf16()
        step = per_step[("vision_encoder" in cfg.freeze), bf16]
        lines = sum(LINES[f] for f in cfg.data.train + cfg.data.val)
        seconds = cfg.steps * step + lines * per_line
        total += seconds
        print(f"| {name} ({'bf16' if bf16 else 'fp32'}{', encoder frozen' if 'vision_encoder' in cfg.freeze else ''})"
              f" | {cfg.steps} steps, {lines} lines | {fmt(seconds)} |")
    target = TARGET_S[device.type]
    print(f"| **total** | | **{fmt(total)}** (target {fmt(target)}: "
          f"{'met' if total <= target else f'{total / target:.1f}x over'}) |")


if __name__ == "__main__":
    main()
