"""CPU benchmark: `pixtral train` as one process with one torch thread per core, against one
process per core (`torchrun`, DDP over gloo) with one thread each.

    .venv/bin/python research/benchmarks/bench_cpu_ddp_training.py [--steps 60] [--cores 2] [--rounds 1]

Both ways run the default model's first stage (configs/default_model_stage1.yaml: from scratch,
encoder frozen at the centering start, packed sequences of 1024 tokens) on the same synthetic
grid-layout data, through the real CLI. One process takes one packed sequence per step; the DDP run
takes one per process, so `--cores` per step. Each way's throughput is the packed tokens of every
step after the first five (warm-up) over the seconds they took, from the run's metrics.jsonl; the
data encoding at the start is not timed. A small model's matrix products do not split well over
threads, so processes can use the cores better than threads can; the cost is a larger global batch
(a recipe moved to it needs its steps and learning rate revisited).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # common.py
from common import describe_machine, write_training_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 5


def write_config(path: Path, data: Path, out_dir: Path, steps: int) -> Path:
    cfg = yaml.safe_load((REPO / "configs/default_model_stage1.yaml").read_text())
    cfg["out_dir"] = str(out_dir)
    cfg["data"].update(train=[str(data / "pretrain.jsonl"), str(data / "train.jsonl")], val=[], workers=1)
    cfg.update(steps=steps, save_every=10 * steps, eval_every=0, log_every=steps)
    path.write_text(yaml.safe_dump(cfg))
    return path


def tokens_per_second(metrics: Path) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "tokens" in r]  # one per step
    first, timed = rows[WARMUP_STEPS - 1], rows[WARMUP_STEPS:]
    return sum(r["tokens"] for r in timed) / (timed[-1]["elapsed_s"] - first["elapsed_s"])


def run(cmd: list[str], threads: int, log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with log.open("w") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd)} exited with {rc}; last lines of {log}:\n{tail}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="threads of the one process, and processes of the DDP run (default: one per core)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of both runs (default 1)")
    args = ap.parse_args(argv)
    if args.steps <= WARMUP_STEPS + 1:
        raise SystemExit(f"--steps must be more than {WARMUP_STEPS + 1} (the first {WARMUP_STEPS} are warm-up), "
                         f"got {args.steps}")
    for name in ("cores", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")

    python = sys.executable
    ways = {
        f"1 process x {args.cores} threads": ([python, "-m", "pixtral.cli.main"], args.cores),
        f"{args.cores} processes x 1 thread (DDP, gloo)":
            ([python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.cores}",
              "-m", "pixtral.cli.main"], 1),
    }
    rates: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_training_data(tmp / "synth", 600, questions="all", documents="reading")
        for round_ in range(args.rounds):
            for k, (name, (launcher, threads)) in enumerate(ways.items()):
                out_dir = tmp / f"run{round_}_{k}"
                config = write_config(tmp / f"run{round_}_{k}.yaml", data, out_dir, args.steps)
                run(launcher + ["train", "--config", str(config)], threads, tmp / f"run{round_}_{k}.log")
                rates[name].append(tokens_per_second(out_dir / "metrics.jsonl"))

    torch.set_num_threads(args.cores)  # as the one-process run had it, for the machine line
    print(describe_machine(torch.device("cpu")))
    print(f"`pixtral train`, configs/default_model_stage1.yaml, float32, {args.steps} steps per run "
          f"(the first {WARMUP_STEPS} not timed), {args.rounds} round(s); median packed tokens per second "
          "(higher is better)\n")
    (one, one_rate), (ddp, ddp_rate) = ((n, statistics.median(r)) for n, r in rates.items())
    print(f"| {one} | {ddp} | ratio |")
    print("|---|---|---|")
    print(f"| {one_rate:.0f} | {ddp_rate:.0f} | {ddp_rate / one_rate:.2f}x |")


if __name__ == "__main__":
    main()
