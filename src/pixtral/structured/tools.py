"""Tool calling in Mistral's format, through mistral-common's request types.

OpenAI `tools` and `tool_choice` become mistral-common `Tool`s (the prompt then holds them as the
tokenizer version defines: `[AVAILABLE_TOOLS]...` before the last user turn). The model answers a
call with the `[TOOL_CALLS]` control token and, in the Tekken versions below v11 that our models
use, a JSON list `[{"name": ..., "arguments": {...}}]`; `parse_tool_calls` turns that into OpenAI
`tool_calls`. mistral-common's `GrammarFactory` only knows the v11+ syntax (`name[ARGS]{...}`), so
the grammar of a forced call is built here, for the list syntax: with `tool_choice` "required" or
a named function the output is `[TOOL_CALLS]` then that list, each call's arguments constrained to
its function's parameter schema. Tokenizers of v11 and later are refused (their syntax differs).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from mistral_common.protocol.instruct.tool_calls import Function, Tool
from mistral_common.tokens.tokenizers.base import SpecialTokens, TokenizerVersion

from pixtral.errors import RequestError
from pixtral.structured.grammar import JSON_OPTIONS, StructuredOutput

MAX_TOOLS = 128
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names (mistral-common's too)
_ID_CHARS = string.ascii_letters + string.digits


@dataclass
class ToolRequest:
    """A request's tools, as mistral-common's types, and which of them the model must call."""

    tools: list[Tool]
    choice: str  # "auto", "none", "required", or "function" (a named one: `name`)
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def structured_output(self, tool_calls_id: int, answer: dict | None = None) -> StructuredOutput | None:
        """The grammar of the output (None when the model may answer in free text): with a forced call the
        `[TOOL_CALLS]` token, then a JSON list of calls to the allowed functions, each with arguments of its
        parameter schema; with `answer` (a response_format schema) and tool_choice auto, either that
        JSON answer or such calls."""
        if self.choice == "none" or (not self.forced and answer is None):
            return None
        allowed = [t for t in self.tools if self.choice == "required" or t.function.name == self.name]
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": t.function.name},
                                 "arguments": t.function.parameters or {"type": "object"}}} for t in allowed]
        schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                  "x-guidance": JSON_OPTIONS}
        if not self.parallel:
            schema["maxItems"] = 1
        rule = f"<[{tool_calls_id}]> %json {json.dumps(schema, ensure_ascii=False)}"
        if not self.forced:
            rule = f"%json {json.dumps({**answer, 'x-guidance': JSON_OPTIONS}, ensure_ascii=False)} | {rule}"
        return StructuredOutput(lark=f"start: {rule}", where="tool_choice" if self.choice == "function" else "tools")


def parse_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any = None) -> ToolRequest | None:
    """OpenAI `tools` / `tool_choice` / `parallel_tool_calls` -> a ToolRequest (None without tools).
    Raises RequestError naming the field at fault."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of tools")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"'tools' takes at most {MAX_TOOLS} tools, got {len(tools)}")
    parsed = [_tool(i, t) for i, t in enumerate(tools)]
    names = [t.function.name for t in parsed]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RequestError(f"'tools[{i}].function.name': {name!r} is defined twice")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise RequestError("'parallel_tool_calls' must be a boolean")
    parallel = parallel_tool_calls is not False
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return ToolRequest(parsed, tool_choice or "auto", parallel=parallel)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(
            tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise RequestError(f"'tool_choice.function.name': {name!r} is not one of the tools {names}")
        return ToolRequest(parsed, "function", name=name, parallel=parallel)
    raise RequestError("'tool_choice' must be 'auto', 'none', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}")


def _tool(i: int, tool: Any) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise RequestError(f"'{where}' must be {{'type': 'function', 'function': {{...}}}}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise RequestError(f"'{where}.function' must be an object with 'name' and 'parameters'")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise RequestError(f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-', got {name!r:.80}")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise RequestError(f"'{where}.function.description' must be a string")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise RequestError(f"'{where}.function.parameters' must be a JSON schema of an object")
    # The schema must compile, whatever the tool_choice: a call the model makes is checked against it.
    StructuredOutput(json_schema=parameters, where=f"{where}.function.parameters").check()
    return Tool(function=Function(name=name, description=description, parameters=parameters))


def check_tokenizer(processor) -> int:
    """The `[TOOL_CALLS]` token id of a tokenizer whose tool-call syntax we parse (a JSON list: below v11)."""
    inner = processor.tokenizer.instruct_tokenizer.tokenizer
    if not inner.version < TokenizerVersion.v11:
        raise RequestError(f"'tools': tool calls with tokenizer {inner.version.value} are not supported "
                           "(the v11 syntax)")
    try:
        return inner.get_special_token(SpecialTokens.tool_calls.value)
    except Exception:  # noqa: BLE001 - mistral-common raises its own types for a missing token
        raise RequestError("'tools': this model's tokenizer has no [TOOL_CALLS] token") from None


def new_call_id() -> str:
    """A tool call id as Mistral's tokenizers require: 9 letters or digits."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def parse_tool_calls(token_ids: list[int], text: str, tool_calls_id: int) -> list[dict[str, Any]] | None:
    """A choice's output -> OpenAI tool calls, or None when it is not a complete, well-formed call list
    (then it is an answer in text). `text` is the output decoded without control tokens."""
    if not token_ids or token_ids[0] != tool_calls_id:
        return None
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list) or not calls or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict)
            for c in calls):
        return None
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]
