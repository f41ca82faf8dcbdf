"""torchrun integration: process group from the environment, DDP or FSDP2 wrapping, and the rules
that keep every rank on the same sequence of collectives.

A rank that waits in a collective that another rank never enters waits until the group's
timeout. So work that may fail on one rank only (reading a batch's images, rank 0 writing a
file) runs inside `together`, which ends with an agreement that every rank takes: if the block
raised anywhere, every rank raises, naming the rank and its error. Work that contains
collectives (forward, backward, state gathering) is run the same number of times on every rank.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pixtral.errors import ConfigError, PixtralError


class RankFailed(PixtralError):
    """Another rank raised or died: this one stops too."""


class CollectiveTimeout(PixtralError):
    """A collective got no answer from some rank within `dist_timeout_s`."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 1800.0
    owns_group: bool = False  # set up here, so torn down here (not when a caller brought its own)
    where: str = "starting"  # what the ranks are doing: named when a collective fails

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPU, gloo on CPU. `timeout_s` bounds
    every collective (gloo raises, NCCL's watchdog aborts the process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    return Dist(rank, world, local_rank, dev, timeout_s, owns)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(d: Dist, values: list[float]) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


class together:
    """`with together(d, "at step 5 while reading its batch"): ...` around a block without
    collectives that may fail on some ranks only. On leaving it every rank learns whether any
    rank failed; the failing rank raises its own error, the others `RankFailed` naming it."""

    def __init__(self, d: Dist, what: str):
        self.d, self.what = d, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if not self.d.enabled or (kind is not None and not issubclass(kind, Exception)):
            return False  # one process, or Ctrl-C / exit: nothing to agree on
        flag = torch.tensor([0 if exc is None else 1], dtype=torch.int32, device=self.d.device)
        dist.all_reduce(flag)
        if not flag.item():
            return False
        errors: list = [None] * self.d.world
        dist.all_gather_object(errors, None if exc is None else f"{type(exc).__name__}: {exc}")
        if exc is not None:
            return False  # its own error, with its traceback
        rank, message = next((r, e) for r, e in enumerate(errors) if e is not None)
        raise RankFailed(f"rank {rank} failed {self.what}: {message}")


def check_same(d: Dist, what: str, summary: str, detail) -> None:
    """Every rank must have loaded the same `detail` (e.g. each sample's length); `summary` says
    what each rank has, in the error."""
    if not d.enabled:
        return
    digest = hashlib.sha256(json.dumps(detail).encode()).hexdigest()[:12]
    seen: list = [None] * d.world
    dist.all_gather_object(seen, (digest, summary))
    if len({s[0] for s in seen}) > 1:
        per_rank = ", ".join(f"rank {r}: {s[1]}" for r, s in enumerate(seen))
        raise ConfigError(f"{what}: the ranks loaded different samples ({per_rank}); every rank must read the same "
                          "files and images (does each node have the same copy?)")


def explain(exc: BaseException, d: Dist) -> PixtralError | None:
    """A collective's failure in words that name the step, or None if `exc` is something else."""
    if not d.enabled or not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():  # gloo words it both ways
        return CollectiveTimeout(f"{d.where}: no answer from the other ranks within dist_timeout_s={d.timeout_s:g} s; "
                                 f"one of them is stuck or gone ({first})")
    if "closed by peer" in text or "reset by peer" in text:
        return RankFailed(f"{d.where}: another rank stopped; its own error is in its output ({first})")
    return None


def wrap(module: nn.Module, d: Dist, kind: str) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard`) per decoder / vision block and then the root."""
    if not d.enabled:
        return module
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model = module.model
        for block in model.layers:
            fully_shard(block)
        if hasattr(model, "vision_encoder"):
            for block in model.vision_encoder.transformer.layers:
                fully_shard(block)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: a batch without images leaves the vision tower unused.
    return DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                   find_unused_parameters=True)
