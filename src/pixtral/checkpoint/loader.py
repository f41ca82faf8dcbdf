"""Load a checkpoint of either layout straight onto the target device and dtype.

The model is built on the meta device (no memory), then each tensor is read from its file,
permuted if it comes from the HF layout, cast and moved to the device on its own, so the peak
host memory is one tensor, not a second copy of the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pixtral.checkpoint.files import find_files, read_args
from pixtral.checkpoint.reader import TensorReader
from pixtral.errors import CheckpointError
from pixtral.model.pixtral import Pixtral


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _check_memory(n_bytes: int, device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cpu":
        return
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if n_bytes > total:
        raise CheckpointError(
            f"the model needs {n_bytes / 2**30:.1f} GiB in {dtype} but this machine has "
            f"{total / 2**30:.1f} GiB of memory; choose a smaller dtype (e.g. bfloat16) or a GPU"
        )


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Pixtral:
    """Load a Pixtral checkpoint (Mistral-native or Hugging Face layout, detected); None: the default model."""
    if path is None:
        from pixtral.assets import default_model_dir

        path = default_model_dir()
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    files = find_files(path)
    args = read_args(files)
    reader = TensorReader(files, args)  # all checks on headers, before any allocation
    n_params = sum(info.nbytes // info.dtype.itemsize for _, info in reader.tensors.values())
    _check_memory(n_params * dtype.itemsize, device, dtype)

    with torch.device("meta"):
        model = Pixtral(args)
    fill_parameters(model, reader, device, dtype)
    return model


def fill_parameters(model: nn.Module, reader: TensorReader, device: torch.device, dtype: torch.dtype,
                    read=None) -> None:
    """Fill a meta-device model from the reader, one tensor at a time, and set it up for inference.

    `read(name)` gives each parameter's tensor (default: the whole stored tensor; a tensor-parallel
    rank passes one that reads its slice). The reader is closed at the end.
    """
    read = read or reader.read
    params = dict(model.named_parameters())
    try:
        for ours, (stored_name, info) in reader.tensors.items():
            tensor = read(ours)
            if not torch.is_floating_point(tensor):
                raise CheckpointError(f"{info.file}: tensor {stored_name!r} has non-float dtype {tensor.dtype}")
            if tensor.shape != params[ours].shape:  # the reader checked the file: a model/plan mismatch is ours
                raise AssertionError(f"{ours}: read {tuple(tensor.shape)}, the model holds {tuple(params[ours].shape)}")
            _set_parameter(model, ours, tensor.to(device=device, dtype=dtype))
            del tensor
    finally:
        reader.close()
    model.eval()
    model.requires_grad_(False)


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
