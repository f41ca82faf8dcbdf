"""The CUDA-graph decode path under tensor parallelism, on two gloo ranks (captures run eagerly).

A replayed graph runs the collectives of its padded batch bucket (rows beyond the real batch
point at the null block); every rank pads alike, so the padded all-reduces and the logits'
all-gather line up, and the real rows' logits equal the whole model's (eager decode attention,
one process) within 1e-4. Capturing itself, and NCCL, need GPUs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pixtral.checkpoint import load_model

from .ranks import run_ranks
from .tp_graph_worker import STEPS, decode_run

WORKER = Path(__file__).with_name("tp_graph_worker.py")


def test_graph_decoder_on_two_ranks_equals_one_process(tp_checkpoints, tmp_path):
    path = tp_checkpoints["hf_kv1_merge"]  # KV heads replicated over the ranks
    job = tmp_path / "job.pt"
    torch.save({"checkpoint": str(path)}, job)
    ranks = run_ranks(WORKER, job, tmp_path, 2, timeout_s=180)
    reference = decode_run(load_model(path, dtype=torch.float32), graphs=False)

    assert ranks[0]["captured"] == ranks[1]["captured"]  # every rank chose the same shapes
    assert {b for b, _ in ranks[0]["captured"]} == {8, 4}  # 5 rows padded to 8, 3 to 4
    assert len(reference["logits"]) == 2 * STEPS
    for step, expected in enumerate(reference["logits"]):
        assert expected.std() > 0.5  # spread logits: a wrong model could not pass by accident
        for rank in ranks:
            got = rank["logits"][step]
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=f"step {step}")
