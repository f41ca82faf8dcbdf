"""Load one tensor-parallel rank's model: only its slices, straight from the safetensors files.

As `pixtral.checkpoint.load_model` does for a whole model: the rank's model is built on the
meta device (`Pixtral(args)` then `shard_model`, no memory), then each parameter is read on its
own, the rank's rows or columns only (`TensorReader.read_slice`), permuted if the checkpoint is
in the HF layout, cast and moved to the device. No rank holds a weight, or a part of one, that
it does not keep; the peak host memory is one slice. Both layouts, single file or sharded.

Quantized: an fp8 checkpoint's scales are sliced with their weights (`scale_split`), and a float
checkpoint loaded with `quantization=` has each slice quantized as it is read (a row-parallel
weight's per-channel scales are then its rank's columns', as `quantize_linears` after
`shard_model` gives).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from pixtral.checkpoint.files import find_files, read_args
from pixtral.checkpoint.loader import _check_memory, default_dtype, fill_parameters, model_bytes, swap_quantized_linears
from pixtral.checkpoint.quantized import StoredLinear
from pixtral.checkpoint.reader import TensorReader
from pixtral.errors import CheckpointError
from pixtral.model.pixtral import Pixtral
from pixtral.parallel.plan import Split, TensorParallelPlan
from pixtral.parallel.tensor_parallel import shard_model


def load_tp_model(path: str | Path, rank: int | None = None, size: int | None = None, *,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None, group=None,
                  spread_images: bool = True, quantization: str | None = None) -> Pixtral:
    """Rank `rank` of `size` of a tensor-parallel Pixtral (either layout).

    `rank`/`size` default to this process's rank and size in `group` (None: the default group),
    which must then be initialised; given explicitly, loading needs no process group (running
    the model does). `device`: this rank's device (e.g. `cuda:{local_rank}`). The result has
    `model.args` = the rank's args (`TensorParallelPlan.local_args`) and `model.tensor_parallel`
    (rank, size, plan, group, and `bytes_read` / `read_shapes`: what this rank read).
    `quantization`: as `pixtral.checkpoint.load_model`'s (None, "fp8", "int8"; a pre-quantized
    checkpoint loads as stored), with `model.quantization` etc. set the same way.
    """
    if rank is None or size is None:
        if not dist.is_initialized():
            raise ValueError("give rank and size, or initialise torch.distributed first")
        rank = dist.get_rank(group) if rank is None else rank
        size = dist.get_world_size(group) if size is None else size
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    files = find_files(path)
    args = read_args(files)
    plan = TensorParallelPlan(args, size, source=str(files.root))  # refuses an impossible size first
    reader = TensorReader(files, args)  # all checks on headers, before any allocation
    splits = plan.splits(rank)

    with torch.device("meta"):
        model = Pixtral(args)
    shard_model(model, rank, size, group, spread_images=spread_images, plan=plan)
    swap_quantized_linears(model, reader, quantization, str(files.root))
    _check_memory(model_bytes(model, dtype), device, dtype)
    for module, linear in reader.linears.items():  # the scales' slices, from their weights'
        weight = reader.tensors[module + ".weight"][1]
        splits[module + ".weight_scale"] = scale_split(splits[module + ".weight"], linear, weight.shape,
                                                       f"{weight.file}: {module}.weight")
        if linear.input_scale:
            splits[module + ".input_scale"] = None  # one number: every rank reads it

    def read(ours: str) -> torch.Tensor:
        split = splits[ours]
        return reader.read(ours) if split is None else reader.read_slice(ours, split.dim, split.start, split.stop)

    fill_parameters(model, reader, device, dtype, read)
    model.tensor_parallel.bytes_read = reader.bytes_read
    model.tensor_parallel.read_shapes = dict(reader.read_shapes)
    return model


def scale_split(split: Split | None, linear: StoredLinear, shape: tuple[int, int], what: str) -> Split | None:
    """The part of a weight's scale that goes with the rank's `split` of the weight.

    Per channel (one per output row): the rank's rows of a column-parallel weight, the whole
    scale for a row-parallel one (its columns share every row's scale). Per tensor: whole.
    Per block: the tiles of the rank's rows or columns, which must start and end on tile edges
    (the last tile of a ragged weight may be partial); a split cutting a tile is refused.
    """
    if split is None or linear.strategy == "tensor":
        return None
    if linear.strategy == "channel":
        return split if split.dim == 0 else None
    tile = linear.block[split.dim]
    if split.start % tile or (split.stop % tile and split.stop != shape[split.dim]):
        side = "rows" if split.dim == 0 else "columns"
        raise CheckpointError(f"{what}: this rank's {side} [{split.start}, {split.stop}) of {shape[split.dim]} cut "
                              f"the fp8 scale blocks of {tile} {side}; choose a tensor-parallel size whose "
                              f"slices are whole blocks")
    return Split(split.dim, split.start // tile, -(-split.stop // tile))
