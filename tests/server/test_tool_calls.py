"""Tool calling through the official openai client against live servers: a forced call (named or
required) whose arguments validate, streamed as OpenAI streams tool calls; a full round trip (call,
tool result, answer); tool_choice none; bad tool definitions are a 400 naming the field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

NAME = "tiny-pixtral"
PARAMETERS = {"type": "object", "additionalProperties": False, "required": ["city", "days", "unit"], "properties": {
    "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                           "parameters": PARAMETERS}},
         {"type": "function", "function": {"name": "get_time", "description": "The local time",
                                           "parameters": {"type": "object", "properties": {},
                                                          "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What will the weather be in Paris for 3 days?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_named_call_arguments_validate(client):
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice=WEATHER, max_tokens=80,
                                       parallel_tool_calls=False, temperature=1.0, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert len(call.id) == 9 and call.id.isalnum()
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)


def test_required_call_streamed(client):
    stream = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True)
    calls, finish, content = {}, None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id:
                call["id"], call["name"] = piece.id, piece.function.name
            call["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    call = calls[0]
    assert call["name"] in ("get_weather", "get_time") and len(call["id"]) == 9
    arguments = json.loads(call["arguments"])
    if call["name"] == "get_weather":
        jsonschema.validate(arguments, PARAMETERS)


def test_round_trip(client):
    first = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice=WEATHER,
                                           parallel_tool_calls=False, max_tokens=80, temperature=0)
    message = first.choices[0].message
    (call,) = message.tool_calls
    conversation = ASK + [message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny"})}]
    answer = client.chat.completions.create(model=NAME, messages=conversation, tools=TOOLS, max_tokens=12,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt
    # another provider's call ids work too (mapped to Mistral's 9-character ids)
    conversation[1]["tool_calls"][0]["id"] = conversation[2]["tool_call_id"] = "call_abc123XYZ"
    again = client.chat.completions.create(model=NAME, messages=conversation, tools=TOOLS, max_tokens=12,
                                           temperature=0)
    assert again.usage.prompt_tokens >= answer.usage.prompt_tokens - 4 and again.choices[0].finish_reason


def test_tool_choice_none_answers_in_text(client):
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8,
                                       temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("tools,tool_choice,param", [
    ([{"type": "function", "function": {"name": "no spaces"}}], "auto", "tools[0].function.name"),
    ([TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(a|b"}}}}}], "auto",
     "tools[1].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "auto",
     "tools[0].function.parameters"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    (TOOLS, "whenever", "tool_choice"),
])
def test_bad_tools_are_a_400_naming_the_field(client, tools, tool_choice, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=ASK, tools=tools, tool_choice=tool_choice, max_tokens=4)
    assert info.value.body["param"] == param and param in info.value.body["message"]


def test_forced_call_with_response_format_is_refused(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=4,
                                       response_format={"type": "json_object"})
    assert info.value.body["param"] == "response_format"
