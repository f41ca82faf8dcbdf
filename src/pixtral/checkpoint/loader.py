"""Load a checkpoint of either layout straight onto the target device and dtype.

The model is built on the meta device (no memory), then each tensor is read from its file,
permuted if it comes from the HF layout, cast and moved to the device on its own, so the peak
host memory is one tensor, not a second copy of the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pixtral.checkpoint.files import HF, find_files, index_tensors, read_args
from pixtral.checkpoint.layout import from_hf_rows, key_specs
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


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Pixtral:
    """Load a Pixtral checkpoint (Mistral-native or Hugging Face layout, detected)."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    files = find_files(path)
    args = read_args(files)
    tensors = index_tensors(files, args)  # all checks on headers, before any allocation
    n_params = sum(info.nbytes // info.dtype.itemsize for _, info in tensors.values())
    _check_memory(n_params * dtype.itemsize, device, dtype)

    with torch.device("meta"):
        model = Pixtral(args)
    perms = {s.mistral: s for s in key_specs(args) if s.permute_heads}
    handles: dict[Path, object] = {}
    try:
        for ours, (stored_name, info) in tensors.items():
            if info.file not in handles:
                handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
            try:
                tensor = handles[info.file].get_tensor(stored_name)
            except Exception as exc:  # the library's own error types vary by version
                raise CheckpointError(f"{info.file}: cannot read tensor {stored_name!r} ({exc})") from None
            if files.layout == HF and ours in perms:
                spec = perms[ours]
                tensor = from_hf_rows(tensor, spec.permute_heads, spec.head_dim)
            if not torch.is_floating_point(tensor):
                raise CheckpointError(f"{info.file}: tensor {stored_name!r} has non-float dtype {tensor.dtype}")
            _set_parameter(model, ours, tensor.to(device=device, dtype=dtype))
            del tensor
    finally:
        handles.clear()
    model.eval()
    model.requires_grad_(False)
    model.checkpoint_path = Path(path)
    return model


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
