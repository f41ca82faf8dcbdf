"""response_format through the official openai client against live servers (the default model and the
tiny random checkpoint): every answer validates against its random schema, streamed or not, mixed in one
batch with unconstrained requests whose answers do not change; `beta.chat.completions.parse` with a
pydantic model; bad schemas are a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from enum import Enum
from pathlib import Path

import jsonschema
import openai
import pytest
from live_server import start
from pydantic import BaseModel, Field

from pixtral.assets import default_model_dir
from pixtral.checkpoint import load_model
from pixtral.engine import EngineConfig
from pixtral.processing import load_processor
from pixtral.structured.grammar import MAX_GRAMMAR_BYTES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "structured"))
from random_schemas import random_schema  # noqa: E402

NAME = "tiny-pixtral"
MESSAGES = [{"role": "user", "content": "Read this invoice and give me JSON."}]


@pytest.fixture(scope="module")
def default_server():
    live, engine = start(load_model(default_model_dir()), load_processor(default_model_dir()),
                         EngineConfig(num_blocks=512, max_num_seqs=16))
    yield live
    live.stop()
    engine.shutdown()


@pytest.fixture(scope="module", params=["default", "tiny"])
def url(request, server):
    return request.getfixturevalue("default_server").url if request.param == "default" else server.url


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_random_schemas_validate_streamed_or_not_mixed_with_free_requests(url):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    rng = random.Random(11)
    schemas = [random_schema(rng) for _ in range(6)]

    async def free(seed):
        r = await client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=16, temperature=1.0,
                                                 seed=seed)
        return r.choices[0].message.content

    async def constrained(i, schema):
        kwargs = dict(model=NAME, messages=MESSAGES, max_tokens=160, response_format=schema_format(schema),
                      temperature=[0, 1.0, 0.8][i % 3], seed=i)
        if i % 2:
            text, finish = "", None
            async for chunk in await client.chat.completions.create(stream=True, **kwargs):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            return text, finish
        r = await client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason

    async def run():
        alone = await asyncio.gather(free(1), free(2))
        mixed = await asyncio.gather(free(1), *(constrained(i, s) for i, s in enumerate(schemas)), free(2))
        await client.close()
        return alone, mixed

    alone, mixed = asyncio.run(run())
    assert [mixed[0], mixed[-1]] == alone
    for schema, (text, finish) in zip(schemas, mixed[1:-1]):
        assert finish == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


class Currency(str, Enum):
    eur = "EUR"
    usd = "USD"


class Item(BaseModel):
    name: str = Field(max_length=8)
    qty: int = Field(ge=1, le=99)


class Invoice(BaseModel):
    number: str = Field(pattern=r"^[A-Z]{2}-[0-9]{3}$")
    currency: Currency
    items: list[Item] = Field(max_length=2)
    paid: bool


def test_client_parse_with_a_pydantic_model(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.beta.chat.completions.parse(model=NAME, messages=MESSAGES, response_format=Invoice,
                                           max_tokens=200, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    invoice = r.choices[0].message.parsed
    assert isinstance(invoice, Invoice) and len(invoice.items) <= 2


def test_json_object(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)


def test_too_few_tokens_end_with_length(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    schema = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"},
                                                      "minItems": 30}}, "required": ["xs"]}
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                       response_format=schema_format(schema))
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6


@pytest.mark.parametrize("response_format,param", [
    (schema_format({"type": "object", "properties": {"a": {"type": "nope"}}}), "response_format.json_schema.schema"),
    (schema_format({"type": "string", "pattern": "(a|b"}), "response_format.json_schema.schema"),
    (schema_format({"enum": ["x" * 100] * (MAX_GRAMMAR_BYTES // 100)}), "response_format.json_schema.schema"),
    (schema_format({"type": "object"}, name="bad name!"), "response_format.json_schema.name"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
     "response_format.json_schema.schema"),
    ({"type": "xml"}, "response_format.type"),
])
def test_bad_response_format_is_a_400_naming_the_field(server, response_format, param):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, response_format=response_format)
    assert info.value.body["param"] == param and param in info.value.body["message"]
    # the server goes on serving
    assert client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2).choices
