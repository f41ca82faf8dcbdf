"""Two ranks on gloo, started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT): every
collective path is taken by every rank, an error on one rank ends the run on all of them with that
error, and a stuck rank ends it at `dist_timeout_s` with the step named."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pixtral.train.config import load_config
from pixtral.train.metrics import read_metrics
from pixtral.train.trainer import train

from .conftest import tiny_config, write_chat_data, write_config
from .test_train import PY, REPO

VAL_SIZES = (1, 2, 3)  # validation samples: 1 and 2 pack into one sequence, fewer than the ranks


class Ranks:
    """`nproc` processes of `python argv...`, one per rank, each with its own log file."""

    def __init__(self, argv: list[str], logs: Path, nproc: int = 2, rank0_max_file_bytes: int | None = None,
                 cwds: list[Path] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.logs = [logs / f"rank{r}.log" for r in range(nproc)]
        self.procs = []
        for r in range(nproc):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "RANK": str(r),
                   "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            limit = rank0_max_file_bytes if r == 0 else None
            preexec = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
            with open(self.logs[r], "w") as log:
                self.procs.append(subprocess.Popen([PY, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   preexec_fn=preexec, cwd=cwds[r] if cwds else None))
        self.started = time.time()

    def wait(self, timeout: float, ranks=None) -> list[float]:
        """Seconds from the start to each rank's exit; past `timeout` the test fails (a hang)."""
        ranks = range(len(self.procs)) if ranks is None else ranks
        exits = {}
        while len(exits) < len(ranks):
            for r in ranks:
                if r not in exits and self.procs[r].poll() is not None:
                    exits[r] = time.time() - self.started
            if time.time() - self.started > timeout:
                self.kill()
                pytest.fail(f"ranks {sorted(set(ranks) - set(exits))} still running after {timeout} s:\n"
                            + "\n".join(self.output(r)[-2000:] for r in ranks))
            time.sleep(0.02)
        return [exits[r] for r in ranks]

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def launch(tmp_path):
    started = []

    def start(argv, **kw) -> Ranks:
        ranks = Ranks(argv, tmp_path, **kw)
        started.append(ranks)
        return ranks

    yield start
    for ranks in started:
        ranks.kill()


def cli(cfg: Path) -> list[str]:
    return ["-m", "pixtral.cli.main", "train", "--config", str(cfg)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Chats about images with every other one text-only, so that under FSDP some ranks' batches
    have no image, and validation files of 1, 2 and 3 samples (the middle one text-only)."""
    root = tmp_path_factory.mktemp("mixed")
    write_chat_data(root, 24, seed=2)
    write_chat_data(root, 3, seed=3, name="val.jsonl")
    text = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}]}
    for name in ("train.jsonl", "val.jsonl"):
        lines = (root / name).read_text().splitlines()
        (root / name).write_text("".join((json.dumps(text) if i % 2 else line) + "\n" for i, line in enumerate(lines)))
    val = (root / "val.jsonl").read_text().splitlines()
    for k in VAL_SIZES:
        (root / f"val{k}.jsonl").write_text("".join(line + "\n" for line in val[:k]))
    return root


def mixed_config(tmp_path: Path, root: Path, k: int, **extra) -> Path:
    cfg = tiny_config(tmp_path / f"run{k}", root / "train.jsonl", steps=4, eval_every=2, save_every=2,
                      **{"data.val": [str(root / f"val{k}.jsonl")], "data.seq_len": 64, **extra})
    return write_config(tmp_path / f"c{k}.yaml", cfg)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, mixed) -> dict:
    """The reference: each validation size in one process, accumulating the two ranks' batches."""
    root = tmp_path_factory.mktemp("one")
    for k in VAL_SIZES:
        train(load_config(mixed_config(root, mixed, k, grad_accum=2)), log=lambda *_: None)
    return {k: root / f"run{k}" for k in VAL_SIZES}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_validate_save_and_match_one_process(tmp_path, mixed, one_process, launch, parallel):
    """Validation every 2 steps on 1, 2 and 3 samples, checkpoints, the best model and the final
    save: the runs finish, with the losses, validation losses and best step of one process."""
    configs = [mixed_config(tmp_path, mixed, k, grad_accum=1, parallel=parallel) for k in VAL_SIZES]
    ranks = launch([str(Path(__file__).parent / "run_configs.py"), *map(str, configs)])
    ranks.wait(timeout=60)
    assert [p.returncode for p in ranks.procs] == [0, 0], ranks.output(0)[-3000:] + ranks.output(1)[-3000:]
    for k in VAL_SIZES:
        ours, ref = (read_metrics(run / "metrics.jsonl") for run in (tmp_path / f"run{k}", one_process[k]))
        assert [r["step"] for r in ours] == [r["step"] for r in ref] == [0, 1, 2, 3, 4]
        for key in ("loss", "val_loss"):
            a, b = [r.get(key) for r in ours], [r.get(key) for r in ref]
            assert [x is None for x in a] == [y is None for y in b], key
            assert max(abs(x - y) for x, y in zip(a, b) if x is not None) < 1e-5, (k, key, a, b)
        exported = [json.loads((run / "final" / "export.json").read_text())["step"]
                    for run in (tmp_path / f"run{k}", one_process[k])]
        assert exported[0] == exported[1], k


def test_a_rank_that_fails_ends_every_rank_with_its_error(tmp_path, chat_data, launch):
    """Rank 0 cannot write the checkpoint (a 300 kB file size limit, as on a full disk): it stops
    with its error, and rank 1, waiting for the save, stops within seconds naming rank 0 and that
    error, not at the collective timeout."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", chat_data, steps=40, save_every=3,
                                                        dist_timeout_s=300))
    ranks = launch(cli(cfg), rank0_max_file_bytes=300_000)
    exits = ranks.wait(timeout=120)
    assert [p.returncode for p in ranks.procs] == [1, 1]
    own = ranks.output(0).strip().splitlines()[-1]
    assert own.startswith("error: ") and "checkpoint.pt: cannot write it ([Errno 27] File too large)" in own, own
    last = ranks.output(1).strip().splitlines()[-1]
    assert last.startswith("error: rank 0 failed at step 3 while writing") and "File too large" in last, last
    assert not (tmp_path / "run" / "checkpoint.pt.tmp").exists()
    assert abs(exits[1] - exits[0]) < 10, exits


def test_a_stuck_rank_ends_the_run_at_the_timeout_naming_the_step(tmp_path, chat_data, launch):
    """Rank 1 stops (SIGSTOP: a hung read, a frozen node) mid-run: rank 0 gives up after
    dist_timeout_s and says at which step, instead of waiting forever."""
    timeout = 8
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", chat_data, steps=5000,
                                                        dist_timeout_s=timeout))
    ranks = launch(cli(cfg))
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert ranks.procs[0].poll() is None and time.time() - ranks.started < 90, ranks.output(0)[-3000:]
        time.sleep(0.01)
    os.kill(ranks.procs[1].pid, signal.SIGSTOP)
    stopped = time.time() - ranks.started
    (exit0,) = ranks.wait(timeout=stopped + 60, ranks=[0])
    assert ranks.procs[0].returncode == 1
    last = ranks.output(0).strip().splitlines()[-1]
    assert last.startswith("error: step "), last
    assert f"no answer from the other ranks within dist_timeout_s={timeout} s" in last, last
    assert timeout - 1 < exit0 - stopped < timeout + 20, (stopped, exit0)


def test_ranks_that_loaded_different_samples_stop_before_training(tmp_path, launch):
    """Two nodes with their own copy of the data, one image missing on the second: that rank skips
    its sample, so the ranks would train on different streams (and, with validation, run different
    numbers of forward passes). Both stop at the start and say what each loaded."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        write_chat_data(node, 12, seed=4)
    (nodes[1] / "images" / "train5.png").unlink()
    # a shared out_dir (rank 0 writes the tokenizer there for all), data relative to each rank's node
    cfg = tiny_config(tmp_path / "run", Path("train.jsonl"), steps=4)
    ranks = launch(cli(write_config(tmp_path / "c.yaml", cfg)), cwds=nodes)
    ranks.wait(timeout=120)
    assert [p.returncode for p in ranks.procs] == [1, 1]
    for r in (0, 1):
        last = ranks.output(r).strip().splitlines()[-1]
        assert last.startswith("error: data.train: the ranks loaded different samples (rank 0: 12 samples") and \
            "rank 1: 11 samples" in last, last
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
