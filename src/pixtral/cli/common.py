"""Options shared by sub-commands (model location, device, dtype)."""

from __future__ import annotations

import argparse
import importlib.util

import torch

from pixtral.errors import PixtralError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


EXTRAS = {  # what each optional part of the package imports (pyproject.toml's extras)
    "server": ("fastapi", "uvicorn", "prometheus_client"),
    "train": ("yaml", "tqdm", "matplotlib"),
    "eval": ("openai", "rich", "matplotlib", "pyarrow"),
}


def require(extra: str, command: str) -> None:
    """Refuse a sub-command whose optional dependencies are not installed, naming the extra."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise PixtralError(f"`pixtral {command}` needs {', '.join(missing)}: install them with "
                           f"pip install 'pixtral[{extra}]'")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH",
                        help="checkpoint directory, Mistral (params.json) or Hugging Face (config.json) layout; "
                             "default: the small model shipped with the package")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights and activations dtype (default: bfloat16 on GPU, float32 on CPU)")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PixtralError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PixtralError("--device: CUDA was requested but no GPU is available")
    return device


def load_model_and_processor(args: argparse.Namespace):
    from pixtral.assets import default_model_dir
    from pixtral.checkpoint import load_model
    from pixtral.processing import load_processor

    path = args.model or default_model_dir()
    device = resolve_device(args.device)
    model = load_model(path, device=device, dtype=DTYPES.get(args.dtype))
    return model, load_processor(path)
