"""Constrained decoding in the engine: every answer parses and validates against its schema (random schemas,
greedy, seeded and free sampling, n choices), on the default model and the tiny random one; unconstrained
rows of the same batch do not change; preemption does not feed a matcher twice; a failing matcher fails
its request alone; too small a max_tokens ends with "length"."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import jsonschema
import pytest

from pixtral.assets import default_model_dir
from pixtral.checkpoint import load_model
from pixtral.engine import LLM
from pixtral.errors import RequestError
from pixtral.generation import SamplingParams
from pixtral.processing import load_processor
from pixtral.structured import StructuredOutput

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "structured"))
from random_schemas import random_schema  # noqa: E402

QUESTION = [{"role": "user", "content": "Extract the invoice as JSON."}]


@pytest.fixture(scope="module")
def default_llm():
    return LLM.from_model(load_model(default_model_dir()), load_processor(default_model_dir()),
                          num_blocks=512, max_num_seqs=16)


@pytest.fixture(scope="module")
def tiny_llm(model, processor):
    return LLM.from_model(model, processor, num_blocks=512, max_num_seqs=16)


def constrained(schema, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 160), structured_output=StructuredOutput(json_schema=schema),
                          **kw)


SAMPLING = [dict(temperature=0), dict(temperature=1.0, seed=7), dict(temperature=1.2, top_p=0.9)]


@pytest.mark.parametrize("which", ["default_llm", "tiny_llm"])
def test_random_schemas_always_validate(request, which):
    llm = request.getfixturevalue(which)
    rng = random.Random(3 if which == "default_llm" else 4)
    schemas = [random_schema(rng) for _ in range(9)]
    params = [constrained(s, **SAMPLING[i % 3]) for i, s in enumerate(schemas)]
    outs = llm.chat([QUESTION] * len(params), params)
    for schema, out in zip(schemas, outs):
        choice = out.outputs[0]
        assert choice.finish_reason == "stop", (schema, choice.text)
        jsonschema.validate(json.loads(choice.text), schema)


def test_unconstrained_rows_do_not_change(default_llm):
    plain = [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=1.0, seed=5, max_tokens=24)]
    alone = [o.outputs[0].token_ids for o in default_llm.chat([QUESTION] * 2, plain)]
    rng = random.Random(5)
    schemas = [random_schema(rng) for _ in range(4)]
    mixed = default_llm.chat([QUESTION] * 6, plain[:1] + [constrained(s, temperature=0) for s in schemas] + plain[1:])
    assert [mixed[0].outputs[0].token_ids, mixed[-1].outputs[0].token_ids] == alone
    for schema, out in zip(schemas, mixed[1:-1]):
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_n_choices_each_validate(tiny_llm):
    schema = random_schema(random.Random(6))
    out = tiny_llm.chat(QUESTION, constrained(schema, n=3, temperature=1.0, seed=1))[0]
    assert len(out.outputs) == 3
    for choice in out.outputs:
        jsonschema.validate(json.loads(choice.text), schema)


def test_json_object_and_grammar_of_any_kind(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=200,
                            structured_output=StructuredOutput(json_object=True))
    (out,) = tiny_llm.chat([QUESTION], params)
    if out.outputs[0].finish_reason == "stop":  # an object of any size: it may need more than max_tokens
        assert isinstance(json.loads(out.outputs[0].text), dict)
    else:
        assert out.outputs[0].finish_reason == "length" and out.outputs[0].text.startswith("{")


def test_preemption_does_not_feed_a_matcher_twice(model, processor):
    # 6 blocks of 16 tokens cannot hold 8 sequences of 30 to 90 tokens: requests are preempted.
    llm = LLM.from_model(model, processor, num_blocks=6, enable_prefix_caching=False)
    rng = random.Random(8)
    schemas = [random_schema(rng) for _ in range(8)]
    outs = llm.chat([QUESTION] * 8, [constrained(s, temperature=0, max_tokens=60) for s in schemas])
    assert llm.engine.stats().preemptions_total > 0
    roomy = LLM.from_model(model, processor, num_blocks=512)
    again = roomy.chat([QUESTION] * 8, [constrained(s, temperature=0, max_tokens=60) for s in schemas])
    for schema, a, b in zip(schemas, outs, again):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        jsonschema.validate(json.loads(a.outputs[0].text), schema)


def test_too_few_tokens_end_with_length(default_llm):
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"},
                                                         "minItems": 20}}, "required": ["items"]}
    (out,) = default_llm.chat([QUESTION], constrained(schema, temperature=0, max_tokens=8))
    choice = out.outputs[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 8
    assert choice.text.startswith('{"items":[')  # a prefix of a valid answer, not a valid one


def test_a_failing_matcher_fails_its_request_alone(tiny_llm):
    engine = tiny_llm.engine
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"], "additionalProperties": False}
    good = engine.add_request(_prompt(tiny_llm), constrained(schema, temperature=0))
    bad = engine.add_request(_prompt(tiny_llm), constrained(schema, temperature=0))
    engine.requests[bad].matcher.consume_token(tiny_llm.processor.encode_text("x")[0])  # now in error
    deltas = {}
    while engine.has_unfinished():
        for d in engine.step():
            deltas.setdefault(d.request_id, []).append(d)
    assert deltas[bad][-1].error and "structured output" in deltas[bad][-1].error
    assert deltas[good][-1].finish_reason == "stop" and not deltas[good][-1].error


def _prompt(llm):
    from pixtral.engine.inputs import chat_prompt
    return chat_prompt(llm.processor, QUESTION)


@pytest.mark.parametrize("params,message", [
    (dict(min_tokens=3), "min_tokens"),
])
def test_conflicting_parameters_are_refused(tiny_llm, params, message):
    with pytest.raises(RequestError, match=message):
        tiny_llm.chat(QUESTION, constrained({"type": "object"}, **params))


def test_bad_schema_is_refused_before_running(tiny_llm):
    with pytest.raises(RequestError, match="'structured_output' cannot be used"):
        tiny_llm.chat(QUESTION, constrained({"type": "object", "properties": {"a": {"type": "nope"}}}))
