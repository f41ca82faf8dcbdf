"""Start a worker script as every rank of a gloo group (as torchrun starts ranks) and collect each rank's results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]


def run_ranks(worker: Path, job: Path, out_dir: Path, size: int, timeout_s: float) -> list:
    """Run `python worker JOB OUT_DIR` as ranks 0..size-1 (RANK, WORLD_SIZE, MASTER_ADDR/PORT set, one
    thread each); fail the test, with the ranks' logs, if one fails or they outlast `timeout_s`.
    Returns what each rank saved to OUT_DIR/rank{r}.pt."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for rank in range(size):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "RANK": str(rank),
               "WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = out_dir / f"rank{rank}.log"
        logs.append(log)
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(worker), str(job), str(out_dir)], env=env,
                                          stdout=f, stderr=subprocess.STDOUT))
    start = time.time()
    try:
        while any(p.poll() is None for p in procs):
            if time.time() - start > timeout_s:
                pytest.fail(f"ranks still running after {timeout_s} s:\n" + "\n".join(l.read_text()[-2000:] for l in logs))
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{logs[rank].read_text()[-4000:]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(size)]


def serve_as_rank(work) -> None:
    """The body of a worker script that `run_ranks` starts (`python worker JOB OUT_DIR`): join the gloo
    group from the environment torchrun would set, run `work(job, rank, size)` on JOB's contents and
    save what it returns to OUT_DIR/rank{r}.pt."""
    job_file, out_dir = sys.argv[1:3]
    torch.set_num_threads(1)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        result = work(torch.load(job_file, weights_only=False), rank, size)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
