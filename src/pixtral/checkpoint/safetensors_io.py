"""Safetensors headers checked up front, and a writer that streams one tensor at a time.

Reading goes through the `safetensors` library; we only parse the header ourselves first so a
truncated or corrupt file is reported by name before anything large is allocated. The library
has no streaming writer, so writing a 12B checkpoint tensor by tensor (without holding it all
in RAM) is done here, following the published format: 8-byte little-endian header length,
JSON header, raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from pixtral.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    # fp8 (quantized checkpoints); e5m2 is listed so a checkpoint holding it is refused by dtype, not as corrupt
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty(0, dtype=self.dtype).element_size()


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of one file, after checking it is complete."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (header length {header_len}, file {size} bytes)")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    data_size = size - 8 - header_len
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        info = TensorInfo(path, dtype, shape)
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has inconsistent size in the header")
        if end > data_size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {name!r} ends at byte {end} of the data section, "
                f"which holds only {data_size} bytes"
            )
        out[name] = info
    return out


def write_safetensors(path: Path, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time: `produce(name)` is called in order, its result written and dropped.

    The file appears atomically (written to a temporary name, then renamed), so an interrupted
    write never leaves a file that looks complete.
    """
    path = Path(path)
    header: dict[str, object] = {"__metadata__": metadata or {}}
    order, offset = [], 0
    for name, shape, dtype in entries:
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        order.append((name, tuple(shape), dtype, nbytes))
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, nbytes in order:
            tensor = produce(name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise CheckpointError(f"{path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert len(data) == nbytes
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
