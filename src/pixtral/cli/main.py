"""`pixtral` command line: one sub-command per module in this package.

Each sub-command module exposes `register(subparsers)`, which adds its parser and sets
`func` to the function that runs it. Modules are imported lazily by name so that
`pixtral --help` stays fast and a broken optional part does not take the others down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pixtral.errors import PixtralError

# Order is the order shown by `pixtral --help`.
SUBCOMMAND_MODULES = [
    "pixtral.cli.chat",
    "pixtral.cli.serve",
    "pixtral.cli.convert",
    "pixtral.cli.init",
    "pixtral.cli.data",
    "pixtral.cli.train",
    "pixtral.cli.eval",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixtral",
        description=(
            "Pixtral vision-language models: chat with a model about images, serve it over an "
            "OpenAI-compatible API, convert checkpoints, train and evaluate. Without --model, "
            "commands use the small default model that ships inside the package."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that part of the CLI is not present in this build
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PixtralError as exc:
        # Our own errors already name the file, key or limit at fault: no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
