"""`pixtral train`: train or fine-tune a model from a YAML config (see configs/)."""

from __future__ import annotations

import argparse
from pathlib import Path

NEEDS_CONFIG = """pixtral train needs --config FILE, a YAML recipe. The smallest, LoRA on the built-in default model:
    model: {init: default}
    lora: {enabled: true}
    data: {train: [my/train.jsonl], val: [my/val.jsonl]}   # {"messages": [...]} per line
    out_dir: runs/my_lora
configs/finetune_lora_cpu.yaml (CPU) and configs/finetune_lora.yaml (GPU) in the source tree are complete ones.
A run already started: --resume --run DIR continues it, --export DST --run DIR saves its latest checkpoint."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a model (full or LoRA) from a YAML config",
        description=(
            "Train from scratch (model.init: preset:NAME) or fine-tune the built-in model (model.init: default) "
            "or a checkpoint (model.init: PATH), fully or with LoRA, on chat or interleaved-document JSONL. "
            "Several GPUs or nodes: torchrun --nproc_per_node N -m pixtral.cli.main train ... "
            "[--set parallel=fsdp]"
        ),
    )
    p.add_argument("--config", help="YAML config file (configs/ has examples)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--run", metavar="DIR",
                   help="the run folder (instead of the config's out_dir); with --resume or --export, "
                        "--config may be left out: the run's own config.yaml is used")
    p.add_argument("--resume", action="store_true",
                   help="continue the run from its last checkpoint; changed settings take effect from there "
                        "(the model, LoRA, freeze, data.train/format/seq_len and seed cannot change)")
    p.add_argument("--export", metavar="DST",
                   help="do not train: save the model of the run's latest checkpoint to DST (both layouts) and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixtral.cli.common import require

    require("train", "train")

    from pixtral.errors import ConfigError
    from pixtral.train.config import load_config
    from pixtral.train.trainer import export_checkpoint, train

    if args.export:
        run_dir = args.run or (load_config(args.config, args.overrides, check=False).out_dir if args.config else None)
        if run_dir is None:
            raise ConfigError("--export DST: name the run folder with --run DIR (or give its --config)")
        dst, step = export_checkpoint(run_dir, args.export)
        print(f"saved the model of step {step} of {run_dir} to {dst} (Mistral and Hugging Face layouts)")
        return 0
    config = args.config
    if config is None:
        if not (args.resume and args.run):
            raise ConfigError(NEEDS_CONFIG)
        config = Path(args.run) / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"{config} not found (runs started before it was written have none): pass --config FILE")
    cfg = load_config(config, args.overrides)
    if args.run:
        cfg.out_dir = args.run
    train(cfg, resume=args.resume)
    return 0
