"""One rank of a tensor-parallel run, started by tests/parallel/test_tensor_parallel.py as torchrun would
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): loads each checkpoint's slices, runs the prompts through
`Pixtral.forward` and a few greedy steps of `generate_ids` (a KV cache sized from the rank's args),
then the images prompt again after `engine.fusion.fuse`, and saves what it got to OUT/rank{r}.pt.

usage: python tp_worker.py JOB.pt OUT_DIR
JOB.pt: {"checkpoints": {name: path}, "prompts": {name: {prompt: (ids, images)}}, "generate": int}
"""

from __future__ import annotations

import torch

from pixtral.engine.fusion import fuse
from pixtral.generation.generate import generate_ids
from pixtral.generation.params import SamplingParams
from pixtral.parallel import load_tp_model

from tests.parallel.ranks import serve_as_rank  # run_ranks puts the repository on the path


def work(job: dict, rank: int, size: int):
    out = {}
    for name, path in job["checkpoints"].items():
        model = load_tp_model(path, dtype=torch.float32)
        tp = model.tensor_parallel
        out[name] = {
            "rank": (tp.rank, tp.size),
            "args": (model.args.n_heads, model.args.n_kv_heads, model.args.hidden_dim, model.args.vocab_size),
            "spread_images": tp.spread_images,
            "bytes_read": tp.bytes_read,
            "logits": {},
            "generated": {},
        }
        with torch.inference_mode():
            for prompt, (ids, images) in job["prompts"][name].items():
                out[name]["logits"][prompt] = model(ids, images)
                steps = generate_ids(model, ids.tolist(), images,
                                     SamplingParams(temperature=0, max_tokens=job["generate"]), eos_id=-1)
                out[name]["generated"][prompt] = [(t, logits.clone()) for t, logits in steps]
            # the engine's load-time fusion on a rank's model: q/k/v and gate/up of the rank fused
            fuse(model, projections=True, kernels=False)
            ids, images = job["prompts"][name]["images"]
            out[name]["fused_logits"] = model(ids, images)
    return out


if __name__ == "__main__":
    serve_as_rank(work)
