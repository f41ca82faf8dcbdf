"""Two ranks on gloo (CPU, float32) give the logits of the whole model, within 1e-4.

One run of two worker processes (`tp_worker.py`, started as torchrun starts ranks) loads each
random checkpoint of `conftest.CHECKPOINTS` (both layouts; KV heads split and replicated; vision
encoder sharded and replicated with the images spread over the ranks; patch merger) and runs a
text prompt and a prompt with three images, plus a few greedy steps with a KV cache. Each result
is compared with the plain model loaded by `pixtral.checkpoint.load_model` (tensor-parallel size 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixtral.checkpoint import load_model
from pixtral.generation.generate import generate_ids
from pixtral.generation.params import SamplingParams

from .conftest import CHECKPOINTS, prompts, tp_args
from .ranks import run_ranks

WORKER = Path(__file__).with_name("tp_worker.py")
SIZE = 2
GENERATE = 3
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tp_run(tp_checkpoints, tmp_path_factory) -> dict:
    """Start both ranks once; returns {"inputs": ..., "ranks": [rank0 results, rank1 results]}."""
    tmp = tmp_path_factory.mktemp("tp_run")
    inputs = {name: prompts(tp_args(name), seed=i) for i, name in enumerate(CHECKPOINTS)}
    job = tmp / "job.pt"
    torch.save({"checkpoints": {n: str(p) for n, p in tp_checkpoints.items()}, "prompts": inputs,
                "generate": GENERATE}, job)
    return {"inputs": inputs, "ranks": run_ranks(WORKER, job, tmp, SIZE, TIMEOUT_S)}


@pytest.fixture(scope="module")
def reference(tp_checkpoints, tp_run) -> dict:
    """The whole model's logits and greedy steps, per checkpoint and prompt."""
    out = {}
    for name, path in tp_checkpoints.items():
        model = load_model(path, dtype=torch.float32)
        out[name] = {}
        with torch.inference_mode():
            for prompt, (ids, images) in tp_run["inputs"][name].items():
                steps = list(generate_ids(model, ids.tolist(), images,
                                          SamplingParams(temperature=0, max_tokens=GENERATE), eos_id=-1))
                out[name][prompt] = (model(ids, images), steps)
    return out


@pytest.mark.parametrize("prompt", ["text", "images"])
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_equal_single_rank(tp_run, reference, name, prompt):
    expected, _ = reference[name][prompt]
    assert expected.std() > 1.0  # logits spread: a wrong model could not pass by accident
    for rank, results in enumerate(tp_run["ranks"]):
        got = results[name]["logits"][prompt]
        assert got.shape == expected.shape, f"rank {rank}"
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=lambda m: f"rank {rank}: {m}")
    # every rank ends with the same full logits (they sample the same token)
    assert torch.equal(tp_run["ranks"][0][name]["logits"][prompt], tp_run["ranks"][1][name]["logits"][prompt])


@pytest.mark.parametrize("prompt", ["text", "images"])
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_steps_with_kv_cache(tp_run, reference, name, prompt):
    """`generate_ids` sizes its KV cache from `model.args`: the rank's KV heads only, same tokens."""
    _, expected = reference[name][prompt]
    for rank, results in enumerate(tp_run["ranks"]):
        got = results[name]["generated"][prompt]
        assert [t for t, _ in got] == [t for t, _ in expected], f"rank {rank}"
        for (_, g), (_, e) in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_engine_fusion_applies_to_a_rank_model(tp_run, reference, name):
    expected, _ = reference[name]["images"]
    for results in tp_run["ranks"]:
        torch.testing.assert_close(results[name]["fused_logits"], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_rank_models_hold_local_heads(tp_run, name):
    args = tp_args(name)
    for rank, results in enumerate(tp_run["ranks"]):
        r = results[name]
        assert r["rank"] == (rank, SIZE)
        # query heads and FFN halved; one KV head per rank (split 2/2, or the single one replicated);
        # the vocabulary stays whole: it is the logits' width
        assert r["args"] == (args.n_heads // 2, 1, args.hidden_dim // 2, args.vocab_size)
        assert r["spread_images"] == (name in ("mistral_kv1", "hf_kv1_merge"))
