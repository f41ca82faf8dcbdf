"""One rank of a tensor-parallel run over fp8 checkpoints, started by tests/quant/test_tp_fp8.py as torchrun
would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): `load_tp_model` of each checkpoint (its slices of the
weights and scales), the logits of each prompt, saved to OUT/rank{r}.pt.

usage: python tp_fp8_worker.py JOB.pt OUT_DIR
JOB.pt: {"checkpoints": {name: (path, quantization)}, "prompts": {name: {prompt: (ids, images)}}}
"""

from __future__ import annotations

import torch

from pixtral.parallel import load_tp_model

from tests.parallel.ranks import serve_as_rank  # run_ranks puts the repository on the path


def work(job: dict, rank: int, size: int):
    out = {}
    for name, (path, quantization) in job["checkpoints"].items():
        model = load_tp_model(path, dtype=torch.float32, quantization=quantization)
        with torch.inference_mode():
            out[name] = {"logits": {p: model(ids, images) for p, (ids, images) in job["prompts"][name].items()},
                         "quantization": (model.quantization, model.quantization_source),
                         "read_shapes": model.tensor_parallel.read_shapes}
    return out


if __name__ == "__main__":
    serve_as_rank(work)
