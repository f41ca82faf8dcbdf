"""Read a checkpoint's tensors one at a time, by Mistral name and in the Mistral RoPE convention."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from pixtral.checkpoint.files import HF, CheckpointFiles, index_tensors
from pixtral.checkpoint.layout import from_hf_rows, key_specs
from pixtral.checkpoint.safetensors_io import TensorInfo
from pixtral.errors import CheckpointError
from pixtral.model.args import ModelArgs


class TensorReader:
    """Shared by loading and conversion: HF q/k rows are permuted back on the way in."""

    def __init__(self, files: CheckpointFiles, args: ModelArgs):
        self.layout = files.layout
        self.tensors: dict[str, tuple[str, TensorInfo]] = index_tensors(files, args)  # header checks only
        self._perms = {s.mistral: s for s in key_specs(args) if s.permute_heads}
        self._handles: dict[Path, object] = {}

    def read(self, ours: str) -> torch.Tensor:
        stored_name, info = self.tensors[ours]
        if info.file not in self._handles:  # open each file once; tensors are memory-mapped from it
            self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        try:
            tensor = self._handles[info.file].get_tensor(stored_name)
        except Exception as exc:  # the library's own error types vary by version
            raise CheckpointError(f"{info.file}: cannot read tensor {stored_name!r} ({exc})") from None
        if self.layout == HF and ours in self._perms:
            spec = self._perms[ours]
            tensor = from_hf_rows(tensor, spec.permute_heads, spec.head_dim)
        return tensor

    def close(self) -> None:
        self._handles.clear()
