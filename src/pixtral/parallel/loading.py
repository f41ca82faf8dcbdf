"""Load one tensor-parallel rank's model: only its slices, straight from the safetensors files.

As `pixtral.checkpoint.load_model` does for a whole model: the rank's model is built on the
meta device (`Pixtral(args)` then `shard_model`, no memory), then each parameter is read on its
own, the rank's rows or columns only (`TensorReader.read_slice`), permuted if the checkpoint is
in the HF layout, cast and moved to the device. No rank holds a weight, or a part of one, that
it does not keep; the peak host memory is one slice. Both layouts, single file or sharded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from pixtral.checkpoint.files import find_files, read_args
from pixtral.checkpoint.loader import _check_memory, default_dtype, fill_parameters
from pixtral.checkpoint.reader import TensorReader
from pixtral.model.pixtral import Pixtral
from pixtral.parallel.plan import TensorParallelPlan
from pixtral.parallel.tensor_parallel import shard_model


def load_tp_model(path: str | Path, rank: int | None = None, size: int | None = None, *,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None, group=None,
                  spread_images: bool = True) -> Pixtral:
    """Rank `rank` of `size` of a tensor-parallel Pixtral (either layout).

    `rank`/`size` default to this process's rank and size in `group` (None: the default group),
    which must then be initialised; given explicitly, loading needs no process group (running
    the model does). `device`: this rank's device (e.g. `cuda:{local_rank}`). The result has
    `model.args` = the rank's args (`TensorParallelPlan.local_args`) and `model.tensor_parallel`
    (rank, size, plan, group, and `bytes_read` / `read_shapes`: what this rank read).
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
    _check_memory(sum(p.numel() for p in model.parameters()) * dtype.itemsize, device, dtype)

    def read(ours: str) -> torch.Tensor:
        split = splits[ours]
        return reader.read(ours) if split is None else reader.read_slice(ours, split.dim, split.start, split.stop)

    fill_parameters(model, reader, device, dtype, read)
    model.tensor_parallel.bytes_read = reader.bytes_read
    model.tensor_parallel.read_shapes = dict(reader.read_shapes)
    return model
