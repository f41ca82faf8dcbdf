"""llguidance or xgrammar for constrained decoding with Tekken: compile time and mask time per token.

    pip install --target /tmp/xg xgrammar apache-tvm-ffi   # not a dependency of pixtral
    PYTHONPATH=/tmp/xg .venv/bin/python research/benchmarks/bench_grammar_libraries.py

One nested invoice schema (objects, an array of objects, an enum, bounded numbers, a string pattern) on
the shipped 131072-token Tekken vocabulary; each library's matcher is driven along the same valid answer
(72 tokens), the mask computed before every token and checked to allow it. The result and the choice
are in docs/serving.md ("Structured outputs and tools").
"""

from __future__ import annotations

import json
import time

import llguidance as llg
import llguidance.torch as llgt
import numpy as np
import xgrammar as xgr
from mistral_common.guidance.tokenizer import from_mistral_tokenizer
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from pixtral.processing.loading import SHIPPED_TEKKEN

SCHEMA = {"type": "object", "required": ["invoice", "items", "paid"], "properties": {
    "invoice": {"type": "object", "required": ["number", "total", "currency"], "properties": {
        "number": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
        "total": {"type": "number", "minimum": 0, "maximum": 100000}, "currency": {"enum": ["EUR", "USD", "GBP"]}}},
    "items": {"type": "array", "maxItems": 5, "items": {"type": "object", "required": ["name", "qty"], "properties": {
        "name": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}}},
    "paid": {"type": "boolean"}}}
ANSWER = json.dumps({"invoice": {"number": "AB-1234", "total": 1234.5, "currency": "EUR"},
                     "items": [{"name": "bolts and nuts", "qty": 3}, {"name": "washers", "qty": 12}], "paid": True})


def drive(fill, allowed, consume, ids) -> list[float]:
    times = []
    for t in ids:
        start = time.perf_counter()
        fill()
        times.append(time.perf_counter() - start)
        assert allowed(t), f"token {t} not allowed"
        assert consume(t)
    return times


def report(name: str, setup_s: float, compile_s: float, times: list[float]) -> None:
    print(f"{name:>10}: tokenizer {1e3 * setup_s:6.1f} ms, compile {1e3 * compile_s:5.1f} ms, mask per token: "
          f"median {1e6 * np.median(times):4.0f} us, mean {1e6 * np.mean(times):4.0f} us, max {1e6 * max(times):4.0f} us")


def main() -> None:
    mistral = MistralTokenizer.from_file(str(SHIPPED_TEKKEN))
    inner = mistral.instruct_tokenizer.tokenizer
    vocab = inner.n_words
    ids = inner.encode(ANSWER, bos=False, eos=False)
    print(f"vocabulary {vocab}, answer {len(ids)} tokens")

    t0 = time.perf_counter()
    tok = from_mistral_tokenizer(mistral)
    t1 = time.perf_counter()
    matcher = llg.LLMatcher(tok, llg.LLMatcher.grammar_from_json_schema(SCHEMA))
    t2 = time.perf_counter()
    mask = llgt.allocate_token_bitmask(1, vocab)
    times = drive(lambda: llgt.fill_next_token_bitmask(matcher, mask, 0),
                  lambda t: bool((mask[0, t // 32] >> (t % 32)) & 1), matcher.consume_token, ids)
    report("llguidance", t1 - t0, t2 - t1, times)

    pieces = [inner.id_to_piece(i).encode() if i < inner.num_special_tokens
              else inner.id_to_byte_piece(i, SpecialTokenPolicy.RAISE) for i in range(vocab)]
    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(pieces, vocab_type=xgr.VocabType.RAW, vocab_size=vocab,
                                                     stop_token_ids=[inner.eos_id]))
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    t2 = time.perf_counter()
    gm, bitmask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab)
    times = drive(lambda: gm.fill_next_token_bitmask(bitmask, 0),
                  lambda t: bool((bitmask[0, t // 32] >> (t % 32)) & 1), gm.accept_token, ids)
    report("xgrammar", t1 - t0, t2 - t1, times)


if __name__ == "__main__":
    main()
