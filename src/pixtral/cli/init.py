"""`pixtral init`: write a checkpoint with random weights for a preset."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from pixtral.model.presets import PRESETS

    p = subparsers.add_parser(
        "init", help="write a random-weight checkpoint of a preset (tests, benchmarks, trying the tools)",
        description="Write a checkpoint with random weights (normal, std 0.02) for a model preset, with a "
                    "matching tekken.json. It produces gibberish: use it to test the plumbing, not to chat.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layout", choices=["mistral", "hf"], default="mistral")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import torch

    from pixtral.checkpoint import save_model
    from pixtral.model import Pixtral, preset
    from pixtral.processing.loading import write_tokenizer_for

    config = preset(args.preset)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    with torch.device("cpu"):
        model = Pixtral(config).to(dtype)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_tokenizer_for(config, Path(tmp) / "tekken.json")
        out = save_model(model, args.out, layout=args.layout, tokenizer_file=tok)
    print(f"wrote random {args.preset} checkpoint ({args.layout} layout) to {out}")
    return 0
