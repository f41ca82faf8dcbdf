"""What the tensor-parallel driver and its workers say to each other, and whether they are in step.

Messages are pickled tuples over a `multiprocessing` connection (a pipe, or TCP under torchrun):
commands from the driver ("encode", "forward", "capture", "resume", "stop") and each rank's answer ("ok", or
"failed" with its error). Images travel as numpy arrays; block tables as what each table gained
since the step before (`BlockTableSender` / `BlockTableReceiver`). `step_outcome` decides, from
every rank's answer, whether the ranks are still in step (see `engine/executor.py`).
"""

from __future__ import annotations

import pickle
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from pixtral.engine.chunk import Chunk
from pixtral.engine.config import EngineConfig

RESUME_GRACE_S = 30.0  # how long a worker that failed a step waits to hear that every rank failed it too
OK = pickle.dumps(("ok",))


@dataclass
class Setup:
    """What a worker needs from the driver to build its part of the engine."""

    path: str
    dtype: torch.dtype | None
    config: EngineConfig  # resolved
    timeout_s: float
    quantization: str | None = None  # as `load_tp_model` takes it


def send(conn: Connection, message: Any) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def image_to_wire(image: torch.Tensor):
    """An image as sent to workers: a numpy array (pickled without torch's shared-memory reductions)."""
    try:
        return image.detach().cpu().contiguous().numpy()
    except TypeError:  # a dtype numpy lacks (bfloat16): the tensor itself
        return image.detach().cpu().contiguous()


def image_from_wire(image) -> torch.Tensor:
    return torch.from_numpy(image) if isinstance(image, np.ndarray) else image


def is_communication_error(exc: BaseException | None = None, message: str | None = None) -> bool:
    """Whether an error came from a collective (a peer gone, a timeout): the group is unusable."""
    if exc is not None:
        dist_error = getattr(torch.distributed, "DistError", None)
        if dist_error is not None and isinstance(exc, dist_error):
            return True
        message = str(exc)
    text = (message or "").lower()
    return "gloo" in text or "nccl" in text or "c10d" in text


def step_outcome(local: BaseException | None, statuses: dict[int, tuple]) -> str | None:
    """None when the ranks are still in step after a command: every rank succeeded, or every rank
    failed with the same error (an input the model cannot take, hit at the same point by each).
    Otherwise why they are not, naming each rank's result."""
    failed = {r: s[1:3] for r, s in statuses.items() if s[0] == "failed"}
    if local is None and not failed:
        return None
    mine = (type(local).__name__, str(local)) if local is not None else None
    if (local is not None and not is_communication_error(local) and len(failed) == len(statuses)
            and all(f == mine for f in failed.values())):
        return None

    def describe(result) -> str:
        return "ok" if result is None else f"failed ({result[0]}: {result[1][:300]})"

    ranks = [f"rank 0 {describe(mine)}"] + [f"rank {r} {describe(failed.get(r))}" for r in sorted(statuses)]
    return "the tensor-parallel ranks fell out of step: " + "; ".join(ranks)


def exit_description(code: int | None) -> str:
    if code is None:
        return "its connection closed"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class BlockTableSender:
    """The driver's side of the block tables its workers keep: each step sends, per chunk, only the
    blocks its request's table gained since the step before (a table grows in place; a new list, after
    a preemption, goes whole). Tables of requests that are not in a step are forgotten on both sides,
    so a request that sits a step out is sent whole when it comes back. What a step costs to send
    grows with its number of sequences, not with their context."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple[list[int], int]] = {}

    def encode(self, chunks: list[Chunk]) -> list[tuple]:
        sent, out = {}, []
        for c in chunks:
            rid, table = c.request.request_id, c.block_ids
            before = self.sent.get(rid)
            if before is not None and before[0] is table and before[1] <= len(table):
                out.append((rid, c.start, c.length, False, table[before[1]:]))
            else:
                out.append((rid, c.start, c.length, True, list(table)))
            sent[rid] = (table, len(table))
        self.sent = sent
        return out


class BlockTableReceiver:
    """A worker's block tables, kept in step with `BlockTableSender`."""

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}

    def decode(self, wire: list[tuple]) -> list[Chunk]:
        tables, chunks = {}, []
        for rid, start, length, whole, blocks in wire:
            table = list(blocks) if whole else self.tables[rid] + blocks
            tables[rid] = table
            chunks.append(Chunk(start, length, table))
        self.tables = tables
        return chunks
