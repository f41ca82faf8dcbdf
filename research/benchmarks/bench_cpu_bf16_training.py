"""CPU benchmark: a training step of the default model in float32 and under bf16 autocast.

    .venv/bin/python research/benchmarks/bench_cpu_bf16_training.py [--steps 8] [--threads 2]

The step of `pixtral train` (forward, backward, clipping, AdamW) on packed sequences of 1024 tokens
of synthetic grid-layout data, starting from the embedded default model with its encoder frozen at
the centering start, as in its recipe's first stages; each way timed over the same batches after one
warm-up step. `cpu_bf16: true` pays off only where the CPU computes in bf16 natively (AVX512-BF16 or
AMX); elsewhere the trainer falls back to float32 (`pixtral.train.trainer.cpu_has_native_bf16`), and
this shows why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # common.py
from common import describe_machine, packed_training_batches, seconds_per_training_step  # noqa: E402

from pixtral.train.trainer import cpu_has_native_bf16  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    batches = packed_training_batches(args.steps + 1, documents="reading")

    # The batches are made beforehand: this compares the model's step alone, both ways.
    cpu = torch.device("cpu")
    times = {label: seconds_per_training_step(cpu, batches.__getitem__, args.steps, True, bf16)
             for label, bf16 in (("float32", False), ("bf16 autocast", True))}

    print(f"{describe_machine(torch.device('cpu'))}; native bf16: {cpu_has_native_bf16()}")
    print(f"{args.steps} steps of 1024 packed tokens, seconds per step (lower is better)\n")
    print("| float32 | bf16 autocast | bf16 / float32 |")
    print("|---|---|---|")
    print(f"| {times['float32']:.3f} | {times['bf16 autocast']:.3f} | {times['bf16 autocast'] / times['float32']:.2f}x |")


if __name__ == "__main__":
    main()
