"""CPU benchmark: a training step with the vision encoder frozen at the centering start, computing
every residual branch of the encoder against skipping the five that are zero.

    .venv/bin/python research/benchmarks/bench_frozen_encoder_step.py [--steps 8] [--rounds 3] [--threads 2]

The step of `pixtral train` (forward, backward, clipping, AdamW) on packed sequences of 1024 tokens
of synthetic grid-layout data, as the default model's recipe runs it while the encoder is frozen
(`model.centering_encoder_init`, `freeze: [vision_encoder]`). The trainer marks the frozen branches
whose output projection is all zeros and skips them (`pixtral.train.trainer.skip_zero_branches`):
the result is the same bit for bit (tests/train/test_train.py). Both ways run on the same batches,
alternating for `--rounds` rounds so that a drift in the machine's speed hits both; the medians
are printed side by side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # common.py
from common import describe_machine, packed_training_batches, seconds_per_training_step  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round and way (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for name in ("steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)

    batches = packed_training_batches(args.steps + 1, questions="all", documents="reading")

    # The batches are made beforehand: this compares the model's step alone, both ways.
    cpu = torch.device("cpu")
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for skip in (False, True):
            times[skip].append(seconds_per_training_step(cpu, batches.__getitem__, args.steps, True, False, skip))
    every, skipped = (statistics.median(times[k]) for k in (False, True))

    print(f"{describe_machine(cpu)}")
    print(f"{args.rounds} rounds of {args.steps} steps of 1024 packed tokens, float32, encoder frozen at the "
          "centering start; median seconds per step (lower is better)\n")
    print("| every encoder branch computed | zero branches skipped | skipped / computed |")
    print("|---|---|---|")
    print(f"| {every:.3f} | {skipped:.3f} | {skipped / every:.2f}x |")


if __name__ == "__main__":
    main()
