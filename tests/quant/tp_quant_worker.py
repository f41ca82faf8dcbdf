"""One rank of a quantized tensor-parallel run, started by tests/quant/test_apply.py as torchrun would
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): builds the job's Pixtral, loads its state dict, shards it
(`shard_model`), quantizes the rank's decoder linears (`quantize_linears`, per scheme) and saves the
logits of the job's prompt to OUT/rank{r}.pt.

usage: python tp_quant_worker.py JOB.pt OUT_DIR
JOB.pt: {"args": ModelArgs, "state": state_dict, "ids": LongTensor [L], "schemes": [str]}
"""

from __future__ import annotations

import torch

from pixtral.model.pixtral import Pixtral
from pixtral.parallel.tensor_parallel import RowParallel, shard_model
from pixtral.quant import quantize_linears

from tests.parallel.ranks import serve_as_rank  # run_ranks puts the repository on the path


def work(job: dict, rank: int, size: int):
    out = {}
    for scheme in job["schemes"]:
        model = Pixtral(job["args"])
        model.load_state_dict(job["state"])
        model.eval().requires_grad_(False)
        shard_model(model, rank, size, spread_images=False)
        names = quantize_linears(model, scheme)
        wo = model.layers[0].attention.wo
        with torch.inference_mode():
            out[scheme] = {"logits": model(job["ids"]), "names": names,
                           "wo": (type(wo).__name__, type(wo.inner).__name__ if isinstance(wo, RowParallel) else None),
                           "params": sorted(n for n, _ in model.named_parameters() if n.startswith("layers.0."))}
    return out


if __name__ == "__main__":
    serve_as_rank(work)
