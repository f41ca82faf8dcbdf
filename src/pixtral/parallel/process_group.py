"""The process group of a tensor-parallel engine: its backend, its rendezvous, and torchrun's environment.

One group holds every rank. On the GPU it is `cpu:gloo,cuda:nccl`: the model's collectives
(CUDA tensors) run on NCCL, and the few CPU-side exchanges at start-up (the driver's address)
on gloo; on the CPU it is gloo alone. Its timeout bounds every collective, so that a rank that
stops answering makes the others fail rather than wait forever.

Two ways to start the ranks:

- the engine spawns them itself (`pixtral serve --tensor-parallel-size N`, `LLM(...,
  tensor_parallel_size=N)`): the driver (rank 0) opens a `TCPStore` on a free loopback port and
  hands its port to the workers it starts (`new_store`, `join_store`);
- `torchrun` starts them (several nodes, or one): every rank finds the rendezvous in the
  environment torchrun sets (`torchrun_env`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT).
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def torchrun_env(environ: dict[str, str] | None = None) -> TorchrunEnv | None:
    """This process's place in a torchrun launch, or None when it was not started by torchrun."""
    env = os.environ if environ is None else environ
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if not all(env.get(n) for n in names):
        return None
    try:
        world = int(env["WORLD_SIZE"])
        return TorchrunEnv(int(env["RANK"]), world, int(env["LOCAL_RANK"]),
                           int(env.get("LOCAL_WORLD_SIZE") or world), env["MASTER_ADDR"], int(env["MASTER_PORT"]))
    except ValueError:
        return None


def backend_for(device: torch.device) -> str:
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def new_store(world_size: int, host: str = "127.0.0.1", timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """The rendezvous of a group this process starts: a store on a free port of `host` (see `.port`)."""
    return dist.TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_store(port: int, world_size: int, host: str = "127.0.0.1",
               timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    return dist.TCPStore(host, port, world_size, False, timeout=datetime.timedelta(seconds=timeout_s))


def init_group(rank: int, world_size: int, device: torch.device, *, store: dist.Store | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the default process group (from `store`, or torchrun's environment when None)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"store": store} if store is not None else {"init_method": "env://"}
    dist.init_process_group(backend_for(device), rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def destroy_group(timeout_s: float = 10.0) -> bool:
    """Leave the default group; -> False when that did not finish within `timeout_s`.

    Bounded because NCCL's teardown can wait on a peer (or, after CUDA graphs captured collectives,
    on the graphs: pytorch/pytorch#115388), and shutdown must never hang: past the limit the group
    is abandoned as it is (the process is about to exit, or will not start another group).
    """
    if not dist.is_initialized():
        return True
    done, errors = threading.Event(), []

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - raised in the caller's thread
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=destroy, name="pixtral-tp-destroy", daemon=True).start()
    finished = done.wait(timeout_s)
    if errors:
        raise errors[0]
    return finished


def broadcast_from_driver(value=None):
    """Rank 0's `value` on every rank (over gloo: CPU memory, whatever the model's device)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def address_toward(host: str) -> str:
    """This machine's address on the route to `host` (what the other nodes can reach us by).

    `PIXTRAL_TP_HOST` overrides it (a node with several interfaces)."""
    override = os.environ.get("PIXTRAL_TP_HOST")
    if override:
        return override
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # no packet is sent: this only picks the route
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
