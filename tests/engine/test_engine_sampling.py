"""Per-request sampling in a batch: seeds, top-k/top-p, stop strings and ids, logprobs."""

from __future__ import annotations

import pytest
import torch
from tiny_model import image_uri, user

from pixtral.engine import LLM
from pixtral.generation.sampling import batched_probs
from pixtral.generation import SamplingParams, chat
from pixtral.generation.sampling import filtered_probs, top_logprobs


@pytest.fixture(scope="module")
def llm(model, processor):
    return LLM.from_model(model, processor, num_blocks=256)


CONV = [user("Tell me about this picture.", image_uri(3))]


def test_seeded_sampling_is_reproducible_and_matches_reference(llm, model, processor):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12)
    others = [[user(f"Other question {i}")] for i in range(6)]
    alone = llm.chat(CONV, params)[0].outputs[0].token_ids
    mixed = llm.chat([*others[:3], CONV, *others[3:]],
                     [SamplingParams(temperature=0.8, max_tokens=5)] * 3 + [params] + [SamplingParams(max_tokens=7)] * 3)
    assert mixed[3].outputs[0].token_ids == alone
    assert alone == chat(model, processor, CONV, params).token_ids
    different = llm.chat(CONV, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=12))[0]
    assert different.outputs[0].token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    greedy = llm.chat(CONV, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    outs = llm.chat([CONV, CONV], [SamplingParams(temperature=1.5, top_k=1, max_tokens=8),
                                   SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=8)])
    assert [o.outputs[0].token_ids for o in outs] == [greedy, greedy]


def test_batched_probs_match_the_reference_filter():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 3
    settings = [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.8), (0.5, 5, 0.5)]
    probs = batched_probs(logits, torch.tensor([s[0] for s in settings]), torch.tensor([s[1] for s in settings]),
                          torch.tensor([s[2] for s in settings]))
    for row, (t, k, p) in enumerate(settings):
        expected = filtered_probs(logits[row], SamplingParams(temperature=t, top_k=k, top_p=p))
        torch.testing.assert_close(probs[row], expected)
    assert int((probs[1] > 0).sum()) == 20 and int((probs[3] > 0).sum()) <= 5


def test_stop_strings_and_stop_ids(llm, model, processor):
    base = llm.chat(CONV, SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert len(base.token_ids) >= 4
    stop_id = base.token_ids[3]
    by_id = llm.chat(CONV, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))[0].outputs[0]
    assert by_id.token_ids == base.token_ids[: base.token_ids.index(stop_id)] and by_id.finish_reason == "stop"
    word = processor.decode(base.token_ids[2:4]).strip()
    params = SamplingParams(temperature=0, max_tokens=10, stop=[word])
    by_text = llm.chat(CONV, params)[0].outputs[0]
    ref = chat(model, processor, CONV, params)
    assert (by_text.text, by_text.finish_reason) == (ref.text, ref.finish_reason) == (base.text.split(word)[0], "stop")


def test_logprobs(llm, model, processor):
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3)
    out = llm.chat(CONV, params)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 4
    # The first token's logprobs from the full-prompt logits of the plain model.
    ids, images = processor.encode_chat(CONV)
    logits = model(torch.tensor(ids), images)[-1]
    chosen, top = top_logprobs(logits, out.token_ids[0], 3)
    assert out.logprobs[0].token_id == out.token_ids[0] == top[0][0]
    assert out.logprobs[0].logprob == pytest.approx(chosen, abs=1e-4)
    assert [t for t, _ in out.logprobs[0].top] == [t for t, _ in top]


def test_ignore_eos_and_eos_stop(llm, processor):
    # Force EOS to be the greedy choice by making it a stop id of another request; here check that
    # ignore_eos requests run to max_tokens and report 'length'.
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"
