"""`pixtral train`: train or fine-tune a model from a YAML config (see configs/)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a model (full or LoRA) from a YAML config",
        description=(
            "Train from scratch (model.init: preset:NAME) or fine-tune a checkpoint (model.init: PATH), "
            "fully or with LoRA, on chat or interleaved-document JSONL. Multi-GPU / multi-node: "
            "torchrun --nproc_per_node N -m pixtral.cli.main train ..."
        ),
    )
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last checkpoint")
    p.add_argument("--export", metavar="DIR",
                   help="do not train: save the model of out_dir's latest checkpoint to DIR (both layouts) and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixtral.train.config import load_config
    from pixtral.train.trainer import export_checkpoint, train

    cfg = load_config(args.config, args.overrides)
    if args.export:
        from pathlib import Path

        if not (Path(cfg.out_dir) / "checkpoint.pt").is_file():
            from pixtral.errors import ConfigError

            raise ConfigError(f"{cfg.out_dir}: no checkpoint.pt to export")
        print(f"saved to {export_checkpoint(cfg.out_dir, args.export)}")
        return 0
    train(cfg, resume=args.resume)
    return 0
