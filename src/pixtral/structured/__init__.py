"""Structured outputs: grammars that constrain what a request may generate (JSON schemas, tool calls)."""

from pixtral.structured.grammar import Grammar, StructuredOutput, grammar_tokenizer

__all__ = ["Grammar", "StructuredOutput", "grammar_tokenizer"]
