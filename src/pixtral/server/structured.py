"""Structured outputs and tools in the chat API: OpenAI's `response_format`, `tools`, `tool_choice` and
`parallel_tool_calls` -> the request's constraint (compiled off the event loop), and the model's tool
calls back into OpenAI's message and stream shapes. Errors are 400s naming the field at fault."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from pixtral.errors import RequestError
from pixtral.server.errors import APIError
from pixtral.structured import StructuredOutput, grammar_tokenizer
from pixtral.structured.tools import ToolRequest, check_tokenizer, parse_tool_calls, parse_tools

SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name


@dataclass
class ChatConstraints:
    tools: ToolRequest | None = None  # None: no tools, or tool_choice "none" with none to parse
    tool_calls_id: int | None = None  # the [TOOL_CALLS] token, when the output may hold calls
    output: StructuredOutput | None = None  # the grammar the output must match

    @property
    def prompt_tools(self) -> list | None:
        return self.tools.tools if self.tools is not None else None

    @property
    def parses_calls(self) -> bool:
        return self.tools is not None and self.tools.choice != "none"


async def chat_constraints(req, processor) -> ChatConstraints:
    """The request's constraint, compiled (in the thread pool: a large schema takes milliseconds).
    Raises APIError 400 naming the field at fault."""
    try:
        answer = response_format_output(req.response_format)
        tools = parse_tools(req.tools, req.tool_choice, getattr(req, "parallel_tool_calls", None))
    except RequestError as exc:
        raise _api_error(exc) from None
    out = ChatConstraints(tools=tools, output=answer)
    if tools is not None:
        if answer is not None and tools.forced:
            raise APIError(400, "'response_format' cannot be combined with a forced 'tool_choice'",
                           code="invalid_request", param="response_format")
        try:
            out.tool_calls_id = check_tokenizer(processor)
            if answer is not None and tools.choice == "auto":
                answer.check()  # its own errors name response_format, not tools
            calls = tools.structured_output(out.tool_calls_id, _answer_schema(answer))
        except RequestError as exc:
            raise _api_error(exc) from None
        out.output = calls or answer
    if out.output is not None:
        try:
            await run_in_threadpool(lambda: out.output.compile(grammar_tokenizer(processor)))
        except RequestError as exc:
            raise _api_error(exc) from None
    return out


def response_format_output(response_format: Any) -> StructuredOutput | None:
    """OpenAI's response_format -> the output's constraint (None for text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise RequestError("'response_format' must be an object with a 'type'")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True, where="response_format")
    if kind != "json_schema":
        raise RequestError(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r:.80}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError("'response_format.json_schema' must be an object with 'name' and 'schema'")
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.match(name):
        raise RequestError(f"'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-', "
                           f"got {name!r:.80}")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise RequestError("'response_format.json_schema.strict' must be a boolean")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise RequestError("'response_format.json_schema.schema' must be a JSON schema (an object)")
    # Strict or not, the output is held to the schema: that is the point of asking for one.
    return StructuredOutput(json_schema=schema, where="response_format.json_schema.schema")


def _answer_schema(answer: StructuredOutput | None) -> dict | None:
    if answer is None:
        return None
    return {"type": "object"} if answer.json_object else answer.json_schema


def _api_error(exc: RequestError) -> APIError:
    named = re.match(r"'([\w.\[\]]+)'", str(exc))
    return APIError(400, str(exc), code="invalid_request", param=named.group(1) if named else None)


def assistant_message(constraints: ChatConstraints, token_ids: list[int], text: str, finish_reason: str | None
                      ) -> tuple[dict[str, Any], str | None]:
    """A choice's message and finish reason: its tool calls when it made complete ones ("tool_calls")."""
    calls = _calls(constraints, token_ids, text, finish_reason)
    if calls is None:
        return {"role": "assistant", "content": text}, finish_reason
    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"


def _calls(constraints: ChatConstraints, token_ids: list[int], text: str, finish_reason: str | None):
    if not constraints.parses_calls or finish_reason != "stop":
        return None
    return parse_tool_calls(token_ids, text, constraints.tool_calls_id)


class ToolCallStream:
    """One choice's stream when the output may hold tool calls. Text goes out as it comes, unless the choice
    begins with [TOOL_CALLS]: then it is held until the choice ends, and goes out as OpenAI streams tool
    calls (per call a delta with its index, id, type and name, then one with its arguments), or as text
    if it did not come to complete calls (max_tokens, a stop string)."""

    def __init__(self, constraints: ChatConstraints):
        self.constraints = constraints
        self.token_ids: list[int] = []
        self.text = ""
        self.holding: bool | None = None  # unknown until the first token

    def push(self, token_ids: list[int], text: str) -> list[dict[str, Any]]:
        """A piece of the choice -> the deltas to send now."""
        self.token_ids += token_ids
        self.text += text
        if self.holding is None and self.token_ids:
            self.holding = self.token_ids[0] == self.constraints.tool_calls_id
        if self.holding or not text:
            return []
        return [{"content": text}]

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The choice ended -> (the deltas still to send, its finish reason)."""
        if not self.holding:
            return [], finish_reason
        calls = _calls(self.constraints, self.token_ids, self.text, finish_reason)
        if calls is None:
            return ([{"content": self.text}] if self.text else []), finish_reason
        deltas = []
        for i, call in enumerate(calls):
            deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"], "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": call["function"]["arguments"]}}]})
        return deltas, "tool_calls"

