"""One rank of a tensor-parallel run over fp8 checkpoints, started by tests/quant/test_tp_fp8.py as torchrun
would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): `load_tp_model` of each checkpoint (its slices of the
weights and scales), the logits of each prompt, saved to OUT/rank{r}.pt.

usage: python tp_fp8_worker.py JOB.pt OUT_DIR
JOB.pt: {"checkpoints": {name: (path, quantization)}, "prompts": {name: {prompt: (ids, images)}}}
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from pixtral.parallel import load_tp_model


def main(job_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        job = torch.load(job_file, weights_only=False)
        out = {}
        for name, (path, quantization) in job["checkpoints"].items():
            model = load_tp_model(path, dtype=torch.float32, quantization=quantization)
            with torch.inference_mode():
                out[name] = {"logits": {p: model(ids, images) for p, (ids, images) in job["prompts"][name].items()},
                             "quantization": (model.quantization, model.quantization_source),
                             "read_shapes": model.tensor_parallel.read_shapes}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
