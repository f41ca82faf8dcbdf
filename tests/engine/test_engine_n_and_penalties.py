"""Penalties, logit_bias, min_p, min_tokens and n > 1 through the engine, against references computed here.

The references (`penalty_reference`) apply each parameter's definition by hand to the model's own
logits, a plain forward over the sequence so far.
"""

from __future__ import annotations

import pytest
import torch
from penalty_reference import greedy_reference as reference
from penalty_reference import next_logits
from tiny_model import image_uri, user

from pixtral.engine import LLM
from pixtral.generation import SamplingParams, chat

CONV = [user("Tell me a long story about this picture.", image_uri(7))]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def llm(model, processor):
    return LLM.from_model(model, processor, num_blocks=512, max_num_seqs=16)


def plain_greedy(llm) -> list[int]:
    return llm.chat(CONV, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0].outputs[0].token_ids


PENALIZED = {
    "presence": dict(presence_penalty=2.0),
    "frequency": dict(frequency_penalty=1.5),
    "negative frequency": dict(frequency_penalty=-2.0),
    "repetition": dict(repetition_penalty=1.8),
    "repetition below 1": dict(repetition_penalty=0.3),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.3),
}


@pytest.mark.parametrize("name", list(PENALIZED))
def test_greedy_penalties_follow_the_definition_alone_and_in_a_batch(llm, model, processor, name):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **PENALIZED[name])
    expected = reference(model, processor, CONV, params)
    assert llm.chat(CONV, params)[0].outputs[0].token_ids == expected
    others = [[user(f"Something else {i}")] for i in range(3)]
    plain = SamplingParams(temperature=0, max_tokens=6)
    alone_others = [o.outputs[0].token_ids for o in llm.chat(others, plain)]
    mixed = llm.chat([others[0], CONV, others[1], others[2]], [plain, params, plain, plain])
    assert mixed[1].outputs[0].token_ids == expected
    assert [mixed[i].outputs[0].token_ids for i in (0, 2, 3)] == alone_others  # the other rows are untouched
    assert chat(model, processor, CONV, params).token_ids == expected  # the reference loop agrees


def test_penalties_change_the_answer(llm):
    """The references above would pass vacuously if no penalty ever changed a token."""
    base = plain_greedy(llm)
    changed = [llm.chat(CONV, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **PENALIZED[name]))[0]
               .outputs[0].token_ids != base for name in PENALIZED]
    assert sum(changed) >= 3


def test_logit_bias_forces_and_forbids_tokens(llm, model, processor):
    base = plain_greedy(llm)
    forced = llm.chat(CONV, SamplingParams(temperature=0, max_tokens=4, logit_bias={1234: 100}))[0]
    assert forced.outputs[0].token_ids == [1234] * 4
    banned = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logit_bias={base[0]: -100, base[1]: -3.5})
    out = llm.chat(CONV, banned)[0].outputs[0].token_ids
    assert out[0] != base[0] and out == reference(model, processor, CONV, banned)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=6, logit_bias={77: 100})
    assert llm.chat(CONV, seeded)[0].outputs[0].token_ids == [77] * 6


def test_min_tokens_holds_back_eos_and_stop_ids(llm, model, processor):
    base = plain_greedy(llm)
    stop = base[2]
    stopped = llm.chat(CONV, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop]))[0]
    assert stopped.outputs[0].token_ids == base[:base.index(stop)]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop], min_tokens=5)
    held = llm.chat(CONV, params)[0].outputs[0]
    assert held.token_ids == reference(model, processor, CONV, params)
    assert len(held.token_ids) >= 5 and stop not in held.token_ids[:5]
    # EOS is held back too: made the likeliest token by a bias, it still cannot end the answer early.
    eos = processor.eos_id
    forced = SamplingParams(temperature=0, max_tokens=8, min_tokens=3, logit_bias={eos: 100})
    out = llm.chat(CONV, forced)[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "stop"


def test_min_p_keeps_only_tokens_near_the_top(llm, model, processor):
    prompt, images = processor.encode_chat(CONV)
    logits = next_logits(model, prompt, images)
    probs = torch.softmax(logits, -1)
    min_p = 0.5
    allowed = set(torch.nonzero(probs >= min_p * probs.max())[:, 0].tolist())
    assert 1 <= len(allowed) < 20  # a handful of the 131072
    firsts = {llm.chat(CONV, SamplingParams(temperature=1.0, seed=s, max_tokens=1, min_p=min_p))[0]
              .outputs[0].token_ids[0] for s in range(40)}
    assert firsts <= allowed
    unfiltered = {llm.chat(CONV, SamplingParams(temperature=1.0, seed=s, max_tokens=1))[0].outputs[0].token_ids[0]
                  for s in range(40)}
    assert not unfiltered <= allowed  # without min_p the same seeds reach other tokens


def test_seeded_penalized_request_is_the_same_alone_in_a_batch_and_in_the_reference(llm, model, processor):
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=MAX_TOKENS, presence_penalty=1.0,
                            repetition_penalty=1.2, logit_bias={5: 3.0}, min_p=0.01)
    alone = llm.chat(CONV, params)[0].outputs[0].token_ids
    others = [[user(f"Other {i}")] for i in range(3)]
    mixed = llm.chat([others[0], CONV, *others[1:]], [SamplingParams(temperature=0.7, max_tokens=5), params,
                                                      SamplingParams(max_tokens=4), SamplingParams(temperature=0)])
    assert mixed[1].outputs[0].token_ids == alone
    assert chat(model, processor, CONV, params).token_ids == alone


def test_n_choices_share_the_prompt_and_are_reproducible(llm, model, processor):
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=MAX_TOKENS, n=3)
    llm.engine.reset_prefix_cache()  # earlier tests cached this prompt
    before = llm.engine.stats().prompt_tokens_total
    out = llm.chat(CONV, params)[0]
    prompt_len = out.num_prompt_tokens
    assert llm.engine.stats().prompt_tokens_total - before == prompt_len  # computed once, not 3 times
    choices = [o.token_ids for o in out.outputs]
    assert [o.index for o in out.outputs] == [0, 1, 2] and len(set(map(tuple, choices))) == 3
    assert out.num_generated_tokens == sum(len(c) + (o.finish_reason == "stop") for c, o in zip(choices, out.outputs))
    # The first choice uses the seed itself: it is what a single seeded request gives.
    assert choices[0] == chat(model, processor, CONV, SamplingParams(temperature=1.0, seed=42,
                                                                     max_tokens=MAX_TOKENS)).token_ids
    again = llm.chat(CONV, params)[0]
    assert [o.token_ids for o in again.outputs] == choices
    assert llm.engine.stats().kv_blocks_used == 0  # every choice gave its blocks back


def test_n_choices_without_prefix_caching_and_greedy(model, processor):
    llm = LLM.from_model(model, processor, num_blocks=256, max_num_seqs=8, enable_prefix_caching=False)
    out = llm.chat(CONV, SamplingParams(temperature=0, max_tokens=6, n=4))[0]
    assert llm.engine.stats().prompt_tokens_total == out.num_prompt_tokens
    assert len({tuple(o.token_ids) for o in out.outputs}) == 1  # greedy: identical choices, as OpenAI
    assert out.outputs[0].token_ids == plain_greedy(llm)[:6]
    assert llm.engine.stats().kv_blocks_used == 0


def test_n_choices_wait_when_no_sequence_is_free(model, processor):
    """With max_num_seqs 2 only one choice forks at once: the others compute their prompts later."""
    llm = LLM.from_model(model, processor, num_blocks=256, max_num_seqs=2)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=5, n=2)
    roomy = LLM.from_model(model, processor, num_blocks=256, max_num_seqs=8)
    tight = llm.chat([CONV, CONV], [params, params])
    assert [[o.token_ids for o in r.outputs] for r in tight] == \
        [[o.token_ids for o in r.outputs] for r in roomy.chat([CONV, CONV], [params, params])]
    assert llm.engine.stats().kv_blocks_used == 0


def test_aborting_a_request_aborts_its_choices(llm):
    engine = llm.engine
    rid = engine.add_request(_prompt(llm), SamplingParams(max_tokens=50, n=3))
    while engine.stats().num_running < 3:  # the prompt runs, then the choices fork off it
        engine.step()
    assert engine.abort(rid)
    assert engine.stats().num_running == 0 and engine.stats().kv_blocks_used == 0
    assert not engine.abort(rid)
    assert not engine.requests and not engine._choices and not engine._forks  # nothing kept of it
    # Aborted before its prompt ran, the choices waiting for it go too.
    rid = engine.add_request(_prompt(llm), SamplingParams(max_tokens=50, n=3))
    assert engine.abort(rid) and engine.stats().requests_finished_total["abort"] >= 6
    assert not engine.requests and not engine._choices and not engine._forks and not engine.has_unfinished()


def test_n_and_logit_bias_are_checked_against_the_engine(llm, model, processor):
    from pixtral.errors import RequestError

    small = LLM.from_model(model, processor, num_blocks=64, max_num_seqs=4)
    with pytest.raises(RequestError, match=r"'n' = 5 is over the 4 sequences"):
        small.engine.check(_prompt(llm), SamplingParams(n=5, max_tokens=1))
    small.engine.check(_prompt(llm), SamplingParams(n=4, max_tokens=1))
    with pytest.raises(RequestError, match="'logit_bias': token id 131072 is not in the vocabulary"):
        llm.engine.check(_prompt(llm), SamplingParams(logit_bias={131072: 1.0}))
    llm.engine.check(_prompt(llm), SamplingParams(logit_bias={131071: 1.0}, n=16))


def _prompt(llm):
    from pixtral.engine.inputs import chat_prompt

    return chat_prompt(llm.processor, CONV)


@torch.inference_mode()
def test_prompt_logprobs_with_chunked_prefill_and_a_cached_prefix(model, processor):
    """Chunks of 16 tokens, and a second request whose prefix is cached: both get every prompt token's logprob."""
    llm = LLM.from_model(model, processor, num_blocks=256, max_num_batched_tokens=16, max_num_seqs=4)
    ids = [processor.bos_id] + processor.encode_text("A prompt long enough to take several chunks of sixteen. " * 4)
    assert len(ids) > 40
    from pixtral.generation.kv_cache import KVCache

    cache = KVCache(model.args, len(ids), model.device, model.dtype)
    h = model.embed(torch.tensor(ids), None)
    reference = torch.log_softmax(model.logits(model.hidden_states(h, cache.step(len(ids)))).float(), -1)
    llm.generate(ids, SamplingParams(temperature=0, max_tokens=1))  # caches the prompt's blocks
    outs = llm.generate([ids, ids], [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2),
                                     SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, n=2)])
    for out in outs:
        lps = out.prompt_logprobs
        assert len(lps) == len(ids) and lps[0] is None
        for p in range(1, len(ids)):
            assert lps[p].token_id == ids[p]
            assert lps[p].logprob == pytest.approx(float(reference[p - 1, ids[p]]), abs=1e-4)
    top = outs[0].prompt_logprobs[5].top
    assert [t for t, _ in top] == torch.topk(reference[4], 2).indices.tolist()
    assert outs[1].prompt_logprobs[5].top == [] and len(outs[1].outputs) == 2
    assert llm.engine.stats().kv_blocks_used == 0


def test_a_prompt_asking_for_logprobs_runs_in_bounded_chunks(model, processor, monkeypatch):
    from pixtral.engine import scheduler

    llm = LLM.from_model(model, processor, num_blocks=256, max_num_batched_tokens=512, max_num_seqs=4)
    ids = [processor.bos_id] + processor.encode_text("Twenty-odd tokens of text, scored in small pieces here.")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    whole = llm.generate(ids, params)[0]  # the prompt in one step
    monkeypatch.setattr(scheduler, "PROMPT_LOGPROBS_CHUNK", 5)
    steps = llm.engine.stats().steps_total
    pieces = llm.generate(ids, params)[0]
    assert llm.engine.stats().steps_total - steps == -(-len(ids) // 5)
    assert [lp and lp.logprob for lp in pieces.prompt_logprobs] == pytest.approx(
        [lp and lp.logprob for lp in whole.prompt_logprobs], abs=1e-5)
