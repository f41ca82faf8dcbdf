"""Read a checkpoint's tensors one at a time, by Mistral name and in the Mistral RoPE convention.

`read` returns a whole tensor; `read_slice` only a range of its rows or columns, read through
safetensors' `get_slice` from the memory-mapped file, so only that range's bytes are touched
(the tensor-parallel loader: each rank reads its own slices, never a whole sharded weight).
`bytes_read` and `read_shapes` record what was read, for the loader's callers and tests.

A pre-quantized checkpoint (`quantization`, detected from its config) reads the same way: fp8
weights in their dtype, and their scales under our names (`<module>.weight_scale`,
`<module>.input_scale`); `linears` says which linears are stored quantized and how.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from pixtral.checkpoint.files import HF, CheckpointFiles, index_tensors, read_stored_quantization
from pixtral.checkpoint.layout import from_hf_rows, key_specs
from pixtral.checkpoint.safetensors_io import TensorInfo
from pixtral.errors import CheckpointError
from pixtral.model.args import ModelArgs


class TensorReader:
    """Shared by loading and conversion: HF q/k rows are permuted back on the way in."""

    def __init__(self, files: CheckpointFiles, args: ModelArgs):
        self.layout = files.layout
        self.quantization = read_stored_quantization(files)  # an unsupported scheme is refused here
        # header checks only
        self.tensors, self.linears = index_tensors(files, args, self.quantization)
        self._perms = {s.mistral: s for s in key_specs(args) if s.permute_heads}
        for spec in list(self._perms.values()):  # per-row scales follow their q/k rows (block ones hold whole heads)
            module = spec.mistral[: -len(".weight")]
            if module in self.linears and self.linears[module].strategy == "channel":
                self._perms[module + ".weight_scale"] = spec
        self._handles: dict[Path, object] = {}
        self.bytes_read = 0
        self.read_shapes: dict[str, tuple[int, ...]] = {}

    def _handle(self, info: TensorInfo):
        if info.file not in self._handles:  # open each file once; tensors are memory-mapped from it
            self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        return self._handles[info.file]

    def _record(self, ours: str, tensor: torch.Tensor) -> None:
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.read_shapes[ours] = tuple(tensor.shape)

    def read(self, ours: str) -> torch.Tensor:
        stored_name, info = self.tensors[ours]
        handle = self._handle(info)
        try:
            tensor = handle.get_tensor(stored_name)
        except Exception as exc:  # the library's own error types vary by version
            raise CheckpointError(f"{info.file}: cannot read tensor {stored_name!r} ({exc})") from None
        self._record(ours, tensor)
        if self.layout == HF and ours in self._perms:
            spec = self._perms[ours]
            tensor = from_hf_rows(tensor, spec.permute_heads, spec.head_dim)
        return tensor

    def read_slice(self, ours: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of a tensor, reading only those.

        For a q/k weight of the HF layout a row range must hold whole heads: the rotate_half
        permutation acts within each head, so the rows of heads [a, b) of the Mistral-order
        weight are exactly `from_hf_rows` of the HF rows of heads [a, b).
        """
        stored_name, info = self.tensors[ours]
        if dim not in (0, 1) or dim >= len(info.shape) or not 0 <= start < stop <= info.shape[dim]:
            raise ValueError(f"cannot take [{start}, {stop}) along dim {dim} of {ours!r} of shape {list(info.shape)}")
        spec = self._perms.get(ours) if self.layout == HF else None
        if spec is not None and dim == 0 and (start % spec.head_dim or stop % spec.head_dim):
            raise ValueError(f"rows [{start}, {stop}) of {ours!r} are not whole heads of {spec.head_dim}")
        handle = self._handle(info)
        try:
            part = handle.get_slice(stored_name)
            tensor = part[start:stop] if dim == 0 else part[:, start:stop]
        except Exception as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {stored_name!r} ({exc})") from None
        self._record(ours, tensor)
        if spec is not None:
            heads = (stop - start) // spec.head_dim if dim == 0 else spec.permute_heads
            tensor = from_hf_rows(tensor, heads, spec.head_dim)
        return tensor

    def close(self) -> None:
        self._handles.clear()
