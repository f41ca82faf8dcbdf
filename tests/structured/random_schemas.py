"""Seeded random JSON schemas of the kinds extraction asks for: nested objects, arrays, enums, bounded
numbers, required fields, strings with patterns. Every one has a bounded instance size (strings and
arrays have maximum lengths), so a constrained answer fits in a small max_tokens."""

from __future__ import annotations

import random

PATTERNS = [r"^[A-Z]{2}-[0-9]{3}$", r"^[a-z]{1,5}$", r"^(yes|no)$", r"^[0-9]{4}-[0-9]{2}$"]
WORDS = ["alpha", "beta", "gamma", "delta", "EUR", "USD", "paid", "open", "a b", "é"]


def random_schema(rng: random.Random, depth: int = 2) -> dict:
    """An object schema with 1 to 3 properties, some required."""
    names = rng.sample(["name", "total", "items", "kind", "count", "code", "ok", "meta", "rate", "tags"],
                       rng.randint(1, 3))
    props = {name: _value(rng, depth - 1) for name in names}
    required = [n for n in names if rng.random() < 0.7]
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _value(rng: random.Random, depth: int) -> dict:
    kinds = ["string", "pattern", "enum", "integer", "number", "boolean"] + (["array", "object"] if depth > 0 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
    if kind == "number":  # multipleOf bounds the decimals: a random model could otherwise write digits forever
        lo = rng.randint(-10, 10)
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 100),
                "multipleOf": rng.choice([0.5, 0.25, 0.125])}  # exact in binary: jsonschema checks with floats
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {"type": "array", "items": _value(rng, depth - 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    return random_schema(rng, depth)
