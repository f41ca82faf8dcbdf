"""`pixtral data`: data set tools. `pixtral data synth` writes synthetic chat data about
generated charts, tables, documents, diagrams and scenes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pixtral.errors import PixtralError

DEFAULT_VAL_FRAC = 0.05
DEFAULT_TEST_FRAC = 0.05


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="build data sets (synthetic chat data about generated images)",
                                   description="Build data sets for training and evaluation.")
    data_sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    parser.set_defaults(func=lambda args: _no_subcommand(parser))

    synth = data_sub.add_parser(
        "synth",
        help="write synthetic image question/answer conversations (train/val/test JSONL)",
        description=(
            "Write N synthetic conversations about generated images (charts, tables, documents, "
            "diagrams, misc scenes) to DIR: DIR/images/*.png, DIR/train.jsonl, DIR/val.jsonl, "
            "DIR/test.jsonl (chat format), DIR/pretrain.jsonl (one interleaved document per training "
            "image: the image, then a description of everything in it, for pre-training) and "
            "DIR/manifest.json. Every answer is one word or one number read from the image. The "
            "same seed gives byte-identical files."
        ),
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="output directory (created; must be empty unless --overwrite)")
    synth.add_argument("--n", required=True, metavar="N", help="total number of conversations, over all splits")
    synth.add_argument("--seed", default="0", metavar="S", help="random seed (integer, default 0)")
    synth.add_argument("--val-frac", default=str(DEFAULT_VAL_FRAC), metavar="F",
                       help=f"share of conversations in val.jsonl (default {DEFAULT_VAL_FRAC})")
    synth.add_argument("--test-frac", default=str(DEFAULT_TEST_FRAC), metavar="F",
                       help=f"share of conversations in test.jsonl (default {DEFAULT_TEST_FRAC}); train gets the rest")
    synth.add_argument("--categories", default=None, metavar="LIST",
                       help="comma-separated subset of: charts,tables,documents,diagrams,misc (default: all)")
    synth.add_argument("--workers", default="1", metavar="W",
                       help="worker processes (default 1); output does not depend on it")
    synth.add_argument("--layout", default="free", choices=("free", "grid"),
                       help="where labels, values and objects go: anywhere (default), or centred in the "
                            "token cells of the default model (32 px at the 256-px view)")
    synth.add_argument("--documents", default="reading", choices=("reading", "lookup", "ranked", "both"),
                       help="facts in pretrain.jsonl: in reading order (default); lookup: each keyed by what a "
                            "question names, in random order; ranked: largest first where questions compare "
                            "(bars, table columns, document numbers), else as lookup; both: reading order in "
                            "pretrain.jsonl and lookup order in pretrain_lookup.jsonl")
    synth.add_argument("--questions", default="some", choices=("some", "all"),
                       help="questions per image: one, or a few whose answers do not give one another away "
                            "(default; fit for evaluation), or all: every question template of the category "
                            "(training data: more answers per image)")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace a previous `pixtral data synth` output in DIR")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=run_synth)


def _no_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _int(value: str, flag: str, what: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise PixtralError(f"{flag} must be {what}, got {value!r}") from None


def _frac(value: str, flag: str) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        raise PixtralError(f"{flag} must be a fraction in [0, 1), got {value!r}") from None


# Singular and short spellings accepted by --categories.
_ALIASES = {"chart": "charts", "table": "tables", "document": "documents", "docs": "documents",
            "diagram": "diagrams", "scene": "misc", "scenes": "misc"}


def run_synth(args: argparse.Namespace) -> int:
    from pixtral.cli.common import require

    require("train", "data synth")

    from pixtral.data.synth import CATEGORIES, SynthConfig, write_dataset

    if args.categories is None:
        categories = CATEGORIES
    else:
        names = [c.strip().lower() for c in args.categories.split(",") if c.strip()]
        categories = tuple(_ALIASES.get(c, c) for c in names)
    config = SynthConfig(
        out=Path(args.out),
        n=_int(args.n, "--n", "a positive integer (the total number of conversations)"),
        seed=_int(args.seed, "--seed", "an integer"),
        val_frac=_frac(args.val_frac, "--val-frac"),
        test_frac=_frac(args.test_frac, "--test-frac"),
        categories=categories,
        workers=_int(args.workers, "--workers", "a positive integer"),
        overwrite=args.overwrite,
        documents=args.documents,
        layout=args.layout,
        questions=args.questions,
    )
    start = time.perf_counter()
    manifest = write_dataset(config, progress=not args.quiet)
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{manifest['splits'][s]['count']} {s}" for s in ("train", "val", "test"))
    print(f"wrote {config.n} conversations ({counts}) to {config.out} in {seconds:.1f}s")
    return 0
