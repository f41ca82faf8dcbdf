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
    add_quantization_option(parser)


def add_quantization_option(parser) -> None:
    parser.add_argument("--quantization", "-q", choices=("fp8", "int8"), default=None,
                        help="quantize the decoder's linear layers while loading a float checkpoint: fp8 (e4m3; "
                             "fp8 matmuls on H100/H200-class GPUs) or int8 (weight-only, for the CPU); a checkpoint "
                             "stored quantized (fp8) loads as it is without this option")


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
    model = load_model(path, device=device, dtype=DTYPES.get(args.dtype), quantization=args.quantization)
    return model, load_processor(path)


# ---------------------------------------------------------------------- tensor parallelism
def add_tensor_parallel_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=None, metavar="N",
                        help="split the model over N ranks, one process each (one per GPU: cuda:0..N-1 from "
                             "--device; on the CPU, N processes over gloo); the command starts and stops the "
                             "workers itself. Under torchrun it is the world size (several nodes: see docs/serving.md)")


def tensor_parallel_size(args: argparse.Namespace) -> int:
    """The size asked for, checked against torchrun's world size when torchrun started us."""
    from pixtral.parallel.process_group import torchrun_env

    size = args.tensor_parallel_size
    env = torchrun_env()
    if env is not None and env.world_size > 1:
        if size is None:
            size = env.world_size
        elif size != env.world_size:
            raise PixtralError(f"--tensor-parallel-size {size} under torchrun with WORLD_SIZE={env.world_size}: "
                               "launch as many processes as ranks")
    size = 1 if size is None else size
    if size < 1:
        raise PixtralError(f"--tensor-parallel-size must be a positive integer, got {size}")
    return size


def torchrun_worker(args: argparse.Namespace) -> int | None:
    """Under torchrun, on a rank other than 0: serve as a tensor-parallel worker and return the exit
    code (rank 0 runs the command itself and drives the others). None: run the command."""
    from pixtral.parallel.process_group import torchrun_env

    env = torchrun_env()
    if env is None or env.world_size == 1 or env.rank == 0:
        return None
    tensor_parallel_size(args)  # the same checks as rank 0, so a bad launch fails on every rank
    from pixtral.engine.tp_worker import run_torchrun_worker

    return run_torchrun_worker(resolve_device(getattr(args, "device", None)).type)


def check_tensor_parallel_size(path, size: int, device: torch.device) -> None:
    """Refuse a size the model or the machine cannot take, before any process starts."""
    if size == 1:
        return
    from pixtral.engine.executor import check_size

    check_size(path, size, device)
