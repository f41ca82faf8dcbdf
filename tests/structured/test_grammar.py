"""Grammars and masks on the default model's Tekken tokenizer: compile limits, errors naming the field,
masks that allow exactly the tokens the grammar does, matchers that fail alone."""

from __future__ import annotations

import json
import random

import pytest
import torch

from pixtral.errors import RequestError
from pixtral.processing import load_processor
from pixtral.structured import StructuredOutput, grammar_tokenizer
from pixtral.structured.grammar import MAX_GRAMMAR_BYTES
from pixtral.structured.masks import GrammarError, Masker, advance, unpack, unpack_on_device

from random_schemas import random_schema

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["n", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def processor():
    return load_processor(None)


@pytest.fixture(scope="module")
def tok(processor):
    return grammar_tokenizer(processor)


def test_tokenizer_is_built_once_per_processor(processor, tok):
    assert grammar_tokenizer(processor) is tok


def test_matcher_takes_a_valid_answer_and_stops_at_its_end(processor, tok):
    m = StructuredOutput(json_schema=SCHEMA).compile(tok).matcher()
    ids = processor.encode_text('{"n":3,"tag":"b"}')
    done = [advance(m, t) for t in ids]
    assert done == [False] * (len(ids) - 1) + [True]  # nothing may follow the closing brace


def test_each_matcher_is_independent(processor, tok):
    grammar = StructuredOutput(json_object=True).compile(tok)
    a, b = grammar.matcher(), grammar.matcher()
    advance(a, processor.encode_text("{")[0])
    with pytest.raises(GrammarError):
        advance(b, processor.encode_text("x")[0])
    assert not a.is_error() and b.is_error()


def test_mask_allows_exactly_what_the_matcher_accepts(processor, tok):
    grammar = StructuredOutput(json_schema=SCHEMA).compile(tok)
    m = grammar.matcher()
    for t in processor.encode_text('{"n":'):
        advance(m, t)
    masker = Masker(processor.vocab_size)
    logits = torch.randn(3, processor.vocab_size)
    batch = masker.start({"x": m})
    out, errors = batch.apply(logits, [None, "x", None])
    assert not errors
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])  # unconstrained rows untouched
    allowed = torch.isfinite(out[1]).nonzero()[:, 0].tolist()
    assert allowed and {processor.decode([t]) for t in allowed} <= {str(d) for d in range(10)}
    for t in allowed:  # every allowed token is accepted
        assert m.deep_copy().consume_token(t)
    masker.close()


def test_masks_of_several_rows_at_once(processor, tok):
    masker = Masker(processor.vocab_size)
    rng = random.Random(0)
    grammars = [StructuredOutput(json_schema=random_schema(rng)).compile(tok) for _ in range(6)]
    matchers = {str(i): g.matcher() for i, g in enumerate(grammars)}
    out, errors = masker.start(matchers).apply(torch.zeros(6, processor.vocab_size), list(matchers))
    assert not errors
    brace = processor.encode_text("{")[0]
    assert torch.isfinite(out[:, brace]).all() and torch.isfinite(out).sum(dim=1).max() < 10  # objects open
    masker.close()


def test_unpack_pads_a_wider_model_vocabulary():
    mask = torch.tensor([[0b101, -1]], dtype=torch.int32)  # tokens 0, 2, and 32..63
    allowed = unpack(mask, 70)
    assert allowed[0].nonzero()[:, 0].tolist() == [0, 2] + list(range(32, 64))


def test_both_unpackings_agree():
    mask = torch.randint(-2**31, 2**31 - 1, (5, 40), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack(mask, 40 * 32), unpack_on_device(mask))


@pytest.mark.parametrize("schema,field", [
    ({"type": "foo"}, "Invalid type"),
    ({"type": "string", "pattern": "(a|b"}, "regex"),
    ({"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}, ""),
])
def test_bad_schema_is_a_request_error_naming_the_field(tok, schema, field):
    with pytest.raises(RequestError, match=r"'response_format\.json_schema\.schema'.*" + field):
        StructuredOutput(json_schema=schema, where="response_format.json_schema.schema").compile(tok)


def test_too_large_schema_is_refused_before_compiling(tok):
    schema = {"enum": [f"value-{i:06d}" for i in range(MAX_GRAMMAR_BYTES // 10)]}
    with pytest.raises(RequestError, match=f"'rf' is [0-9]+ bytes; the limit is {MAX_GRAMMAR_BYTES}"):
        StructuredOutput(json_schema=schema, where="rf").compile(tok)


def test_only_one_kind_of_constraint():
    with pytest.raises(RequestError):
        StructuredOutput(json_schema={}, json_object=True)
    with pytest.raises(RequestError):
        StructuredOutput(json_schema="not a schema")


def test_compiled_once(tok):
    out = StructuredOutput(json_schema=SCHEMA)
    assert out.compile(tok) is out.compile(tok)


def test_random_schemas_compile_and_are_json(tok):
    rng = random.Random(1)
    for _ in range(20):
        schema = random_schema(rng)
        json.dumps(schema)
        StructuredOutput(json_schema=schema).compile(tok)
