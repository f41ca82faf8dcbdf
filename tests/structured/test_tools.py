"""Tools: OpenAI definitions -> mistral-common's, errors naming the field, the forced-call grammar,
the model's [TOOL_CALLS] output parsed back, and tool messages in the prompt."""

from __future__ import annotations

import json

import pytest

from pixtral.errors import RequestError
from pixtral.processing import load_processor
from pixtral.processing.processor import mistral_call_id
from pixtral.structured import grammar_tokenizer
from pixtral.structured.masks import GrammarError, advance
from pixtral.structured.tools import check_tokenizer, new_call_id, parse_tool_calls, parse_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def processor():
    return load_processor(None)


def calls_text(*calls) -> str:
    return json.dumps([{"name": n, "arguments": a} for n, a in calls], separators=(",", ":"))


def test_forced_call_grammar_takes_a_valid_call_and_stops(processor):
    tid = check_tokenizer(processor)
    tools = parse_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    m = tools.structured_output(tid).compile(grammar_tokenizer(processor)).matcher()
    ids = [tid] + processor.encode_text(calls_text(("get_weather", {"city": "Paris", "days": 2})))
    assert [advance(m, t) for t in ids][-1] is True
    m = tools.structured_output(tid).compile(grammar_tokenizer(processor)).matcher()
    with pytest.raises(GrammarError):  # the named function only
        for t in [tid] + processor.encode_text(calls_text(("get_time", {}))):
            advance(m, t)


def test_required_allows_any_tool_and_parallel_calls(processor):
    tid = check_tokenizer(processor)
    m = parse_tools([WEATHER, TIME], "required").structured_output(tid).compile(
        grammar_tokenizer(processor)).matcher()
    text = calls_text(("get_time", {}), ("get_weather", {"city": "Oslo", "days": 7}))
    assert [advance(m, t) for t in [tid] + processor.encode_text(text)][-1] is True
    m = parse_tools([WEATHER, TIME], "required", parallel_tool_calls=False).structured_output(tid).compile(
        grammar_tokenizer(processor)).matcher()
    with pytest.raises(GrammarError):
        for t in [tid] + processor.encode_text(text):
            advance(m, t)


def test_auto_and_none_do_not_constrain():
    assert parse_tools([WEATHER], "auto").structured_output(9) is None
    assert parse_tools([WEATHER], None).structured_output(9) is None
    assert parse_tools([WEATHER], "none").structured_output(9) is None
    assert parse_tools(None, None) is None


@pytest.mark.parametrize("tools,choice,field", [
    ([{"type": "function", "function": {"name": "bad name"}}], "auto", r"'tools\[0\]\.function\.name'"),
    ([WEATHER, {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(a|b"}}}}}], "auto", r"'tools\[1\]\.function\.parameters'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "auto",
     r"'tools\[0\]\.function\.parameters'"),
    ([{"type": "retrieval"}], "auto", r"'tools\[0\]'"),
    ([WEATHER, WEATHER], "auto", r"'tools\[1\]\.function\.name'.*twice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, r"'tool_choice\.function\.name'"),
    ([WEATHER], "sometimes", r"'tool_choice'"),
    (None, "required", r"'tool_choice' needs 'tools'"),
])
def test_bad_tools_name_the_field(tools, choice, field):
    with pytest.raises(RequestError, match=field):
        parse_tools(tools, choice)


def test_output_parsed_into_openai_tool_calls(processor):
    tid = check_tokenizer(processor)
    ids = [tid] + processor.encode_text(calls_text(("get_weather", {"city": "Paris", "days": 2})))
    (call,) = parse_tool_calls(ids, processor.decode(ids), tid)
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert len(call["id"]) == 9 and call["id"].isalnum()
    text_ids = processor.encode_text("[1, 2]")
    assert parse_tool_calls(text_ids, "[1, 2]", tid) is None  # no [TOOL_CALLS] token: an answer in text
    assert parse_tool_calls([tid] + text_ids, "[1, 2]", tid) is None  # not calls


def test_call_ids():
    assert new_call_id() != new_call_id()
    assert mistral_call_id("abcDEF123") == "abcDEF123"
    other = mistral_call_id("call_8f2c3d0e9a")
    assert len(other) == 9 and other.isalnum() and other == mistral_call_id("call_8f2c3d0e9a")


def test_round_trip_messages_in_the_prompt(processor):
    tools = parse_tools([WEATHER], "auto").tools
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    ids, _ = processor.encode_chat(messages, tools=tools)
    text = processor.tokenizer.decode(ids, special_token_policy="keep")
    assert text.startswith("<s>[AVAILABLE_TOOLS]") and '"name": "get_weather"' in text
    assert "[TOOL_CALLS]" in text and text.endswith("[/TOOL_RESULTS]")
    assert f'"call_id": "{mistral_call_id("call_1")}"' in text


@pytest.mark.parametrize("message,field", [
    ({"role": "tool", "content": "x"}, r"messages\[1\]\.tool_call_id"),
    ({"role": "assistant", "tool_calls": [{"id": "abcdefghi", "function": {"name": "f", "arguments": "{"}}]},
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
])
def test_bad_tool_messages_name_the_field(processor, message, field):
    with pytest.raises(RequestError, match=field):
        processor.encode_chat([{"role": "user", "content": "hi"}, message, {"role": "user", "content": "ok"}])
