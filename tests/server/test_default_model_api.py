"""The new API surface against the embedded default model (trained, so it repeats itself and penalties
matter): loglikelihood through /v1/completions, penalized greedy text, n seeded choices, vocabulary checks."""

from __future__ import annotations

import openai
import pytest
import torch
from live_server import start
from penalty_reference import greedy_ids_reference

from pixtral.assets import default_model_dir
from pixtral.checkpoint import load_model
from pixtral.engine import EngineConfig
from pixtral.generation import SamplingParams
from pixtral.generation.kv_cache import KVCache
from pixtral.processing import load_processor

NAME = "tiny-pixtral"  # the live server's served name
TEXT = "The cat sat on the mat. The cat sat on the mat. The cat"


@pytest.fixture(scope="module")
def served():
    model, processor = load_model(default_model_dir()), load_processor(default_model_dir())
    live, engine = start(model, processor, EngineConfig(num_blocks=256, max_num_seqs=8))
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield model, processor, client
    live.stop()
    engine.shutdown()


@torch.inference_mode()
def test_loglikelihood_equals_the_model_log_softmax(served):
    model, processor, client = served
    ids = [processor.bos_id] + processor.encode_text(TEXT)
    cache = KVCache(model.args, len(ids), model.device, model.dtype)
    h = model.embed(torch.tensor(ids), None)
    reference = torch.log_softmax(model.logits(model.hidden_states(h, cache.step(len(ids)))).float(), -1)
    lp = client.completions.create(model=NAME, prompt=[ids], max_tokens=0, echo=True, logprobs=1,
                                   temperature=0).choices[0].logprobs
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([float(reference[p - 1, ids[p]]) for p in range(1, len(ids))],
                                                  abs=1e-4)
    assert sum(lp.token_logprobs[1:]) < 0


@pytest.mark.parametrize("fields", [dict(frequency_penalty=1.0), dict(presence_penalty=2.0),
                                    dict(repetition_penalty=1.5), dict(frequency_penalty=0.5, logit_bias={"300": 3})])
def test_penalized_text_follows_the_definitions(served, fields):
    model, processor, client = served
    ids = [processor.bos_id] + processor.encode_text(TEXT)
    params = SamplingParams(temperature=0, max_tokens=12, **{
        k: ({int(t): v for t, v in v_.items()} if k == "logit_bias" else v_) for k, v_ in fields.items()})
    expected = greedy_ids_reference(model, ids, [], params, processor.eos_id)
    plain = greedy_ids_reference(model, ids, [], SamplingParams(temperature=0, max_tokens=12), processor.eos_id)
    assert expected != plain  # the model repeats itself: each penalty changes its answer
    openai_fields = {k: v for k, v in fields.items() if k != "repetition_penalty"}
    extra = {k: v for k, v in fields.items() if k == "repetition_penalty"}
    resp = client.completions.create(model=NAME, prompt=TEXT, max_tokens=12, temperature=0, extra_body=extra,
                                     **openai_fields)
    assert resp.choices[0].text == processor.decode(expected)


def test_n_seeded_choices(served):
    _, _, client = served
    kwargs = dict(model=NAME, prompt="Once upon a time", n=3, seed=4, temperature=1.0, max_tokens=12)
    texts = [c.text for c in client.completions.create(**kwargs).choices]
    assert len(set(texts)) == 3
    assert [c.text for c in client.completions.create(**kwargs).choices] == texts
    chat = dict(model=NAME, messages=[{"role": "user", "content": "Once upon a time"}], n=3, seed=4,
                temperature=1.0, max_tokens=12)
    answers = [c.message.content for c in client.chat.completions.create(**chat).choices]
    assert [c.message.content for c in client.chat.completions.create(**chat).choices] == answers


def test_logit_bias_ids_are_checked_against_this_vocabulary(served):
    _, _, client = served
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=TEXT, max_tokens=1, logit_bias={"4000": 1})
    assert err.value.body["param"] == "logit_bias" and "4000" in err.value.body["message"]
    client.completions.create(model=NAME, prompt=TEXT, max_tokens=1, logit_bias={"3999": 1})
