"""`pixtral convert`: between the Mistral-native and Hugging Face checkpoint layouts, optionally to fp8."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint between the Mistral and Hugging Face layouts",
        description="Convert a checkpoint to the other layout, tensor by tensor (bit-exact, low memory). "
                    "q/k projection rows are permuted between the two RoPE conventions.",
    )
    p.add_argument("src", help="checkpoint directory (either layout, detected)")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--to", choices=["hf", "mistral"], required=True, help="target layout")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST once the new one is complete")
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="write the decoder's linear weights as fp8 (e4m3, one scale per output channel) in the "
                        "compressed-tensors layout that vLLM and transformers read (needs --to hf)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixtral.checkpoint import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, args.to, overwrite=args.overwrite, quantization=args.quantization)
    kind = f"{args.quantization} (compressed-tensors) " if args.quantization else ""
    print(f"wrote {kind}{args.to} checkpoint to {out}")
    return 0
