"""What a request's output must match, compiled by llguidance against the model's Tekken tokenizer.

A `StructuredOutput` is a JSON schema, "any JSON object", or a lark grammar (tool calls, see
`tools.py`). Compiling it builds an `LLMatcher` once; every sequence of the request (each of n
choices) then gets a deep copy, which is cheap. The cost of a grammar is bounded twice: the
schema's size in bytes, and llguidance's parser limits (lexer fuel, grammar size, lexer states),
so a pathological schema fails to compile (a `RequestError` naming the field it came from) instead
of holding the engine. Compile off the engine loop (the server does it in its thread pool).

Why llguidance (and not xgrammar): mistral-common ships its bridge to Tekken
(`mistral_common.guidance`), it compiles a grammar in about 2 ms where xgrammar takes about 20
(masks take tens of microseconds per token in both, far below a forward pass), its limits bound a
request's cost, and it installs from one wheel. See docs/serving.md for the measurement.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from pixtral.errors import RequestError

try:  # only structured outputs need it: everything else runs without it (e.g. an older environment)
    import llguidance as llg
except ImportError:
    llg = None

MISSING = ("structured outputs (response_format, tools) need llguidance and mistral-common >= 1.13, whose "
           "Tekken bridge needs Python >= 3.11: pip install 'llguidance>=1.3' 'mistral-common>=1.13'")

MAX_GRAMMAR_BYTES = 64 * 1024  # a schema (or grammar) as JSON text; OpenAI's own limit is of this order
# Tighter than llguidance's defaults (fuel 1M / 200k, grammar size 500k): a compile stays within tens of
# milliseconds and a mask within about 10 ms, whatever the schema.
LIMITS = dict(initial_lexer_fuel=500_000, step_lexer_fuel=100_000, step_max_items=20_000,
              max_lexer_states=50_000, max_grammar_size=100_000)
# Compact JSON with no free whitespace: a model (a random one above all) could otherwise emit spaces forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

_tokenizers: "weakref.WeakKeyDictionary[Any, llg.LLTokenizer]" = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def grammar_tokenizer(processor) -> llg.LLTokenizer:
    """llguidance's view of the processor's tokenizer, built once per processor (about 0.6 s for 131k tokens)."""
    try:
        from mistral_common.guidance.tokenizer import from_mistral_tokenizer
    except ImportError:
        from_mistral_tokenizer = None
    if llg is None or from_mistral_tokenizer is None:
        raise RequestError(MISSING)
    with _tokenizers_lock:
        tok = _tokenizers.get(processor)
        if tok is None:
            try:
                tok = _tokenizers[processor] = from_mistral_tokenizer(processor.tokenizer)
            except (TypeError, ValueError) as exc:
                raise RequestError(f"structured outputs need a Tekken tokenizer: {exc}") from None
        return tok


class Grammar:
    """A compiled grammar: `matcher()` gives a fresh matcher for one sequence."""

    def __init__(self, matcher: llg.LLMatcher):
        self._template = matcher

    def matcher(self) -> llg.LLMatcher:
        return self._template.deep_copy()


@dataclass
class StructuredOutput:
    json_schema: dict | bool | None = None  # the output is JSON valid against this schema
    json_object: bool = False  # the output is a JSON object, any
    lark: str | None = None  # the output matches this llguidance lark grammar (tool calls)
    where: str = "structured_output"  # the request field it came from: errors name it
    _compiled: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (tokenizer, Grammar)

    def __post_init__(self) -> None:
        given = (self.json_schema is not None) + bool(self.json_object) + (self.lark is not None)
        if given != 1:
            raise RequestError(f"'{self.where}': give exactly one of a JSON schema, json_object or a grammar")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool)):
            raise RequestError(f"'{self.where}' must be a JSON schema (an object)")
        if self.lark is not None and not isinstance(self.lark, str):
            raise RequestError(f"'{self.where}' must be a lark grammar (a string)")

    def grammar_text(self) -> str:
        """The llguidance grammar, size-checked (refused before any compiling when too large)."""
        text = self.lark if self.lark is not None else self._schema_text()
        size = len(text.encode())
        if size > MAX_GRAMMAR_BYTES:
            raise RequestError(f"'{self.where}' is {size} bytes; the limit is {MAX_GRAMMAR_BYTES}")
        if self.lark is not None:
            return llg.LLMatcher.grammar_from_lark(text)
        try:
            return llg.LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise RequestError(f"'{self.where}' is not a valid JSON schema: {exc}") from None

    def _schema_text(self) -> str:
        schema = {"type": "object"} if self.json_object else self.json_schema
        try:
            return json.dumps(schema, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"'{self.where}' is not valid JSON: {exc}") from None

    def check(self) -> None:
        """Raise RequestError naming `where` if the grammar is invalid or over a limit (no tokenizer needed:
        tool definitions are checked this way whether or not a call is forced)."""
        if llg is None:
            raise RequestError(MISSING)
        error = llg.LLMatcher.validate_grammar(self.grammar_text(), None, limits=llg.LLParserLimits(**LIMITS))
        if error:
            raise RequestError(f"'{self.where}' cannot be used: {_short(error)}")

    def compile(self, tokenizer: llg.LLTokenizer) -> Grammar:
        """The compiled grammar (compiled on the first call, then kept). Raises RequestError naming
        `where` when the grammar is invalid, uses a feature llguidance does not support, or is over a limit."""
        if llg is None:
            raise RequestError(MISSING)
        if self._compiled is not None and self._compiled[0] is tokenizer:
            return self._compiled[1]
        matcher = llg.LLMatcher(tokenizer, self.grammar_text(), log_level=0, limits=llg.LLParserLimits(**LIMITS))
        if matcher.is_error():
            raise RequestError(f"'{self.where}' cannot be used: {_short(matcher.get_error())}")
        self._compiled = (tokenizer, Grammar(matcher))
        return self._compiled[1]


def _short(message: str, limit: int = 500) -> str:
    """llguidance's error, cut (its verbose form can quote the whole grammar)."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + "…"
