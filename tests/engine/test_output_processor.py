"""Text and stop strings outside the step loop: the output processor alone, then with the engine."""

from __future__ import annotations

import asyncio
import time

import pytest
from tiny_model import user

from pixtral.engine import LLM, AsyncEngine, Engine, EngineConfig
from pixtral.engine.inputs import chat_prompt
from pixtral.engine.output_processor import OutputProcessor
from pixtral.engine.outputs import OutputDelta, RequestMetrics, TokenLogprob
from pixtral.generation import SamplingParams, chat

PIECES = {1: "hel", 2: "lo", 3: " w", 4: "orld", 5: "!", 6: "\N{SNOWMAN}"}


class PieceDecoder:
    """Token i is the text PIECES[i]; token 6 arrives as two halves of its UTF-8 bytes."""

    def __init__(self):
        self.pending = b""

    def push(self, token: int) -> str:
        if token == 6 and not self.pending:
            self.pending = PIECES[6].encode()[:1]
            return ""
        self.pending = b""
        return PIECES[token]

    def flush(self) -> str:
        return ""


class PieceProcessor:
    def stream_decoder(self):
        return PieceDecoder()


def engine_delta(rid: str, token: int | None = None, finish: str | None = None, n: int = 1) -> OutputDelta:
    return OutputDelta(rid, token_ids=[token] if token is not None else [],
                       logprobs=[TokenLogprob(token, -0.5)] if token is not None else [], finish_reason=finish,
                       num_prompt_tokens=3, num_generated_tokens=n, metrics=RequestMetrics(1.0, 2.0, 3.0))


def run(outputs: OutputProcessor, rid: str, tokens: list[int], last_finish: str | None = None):
    """Feed tokens one engine delta at a time -> (the client deltas, the finishes asked of the engine)."""
    deltas, finishes = [], []
    for i, token in enumerate(tokens):
        finish = last_finish if i == len(tokens) - 1 else None
        got, finish_requests = outputs.process([engine_delta(rid, token, finish, n=i + 1)])
        deltas += got
        finishes.append(finish_requests)
    return deltas, finishes


def test_stop_string_across_token_boundaries():
    outputs = OutputProcessor(PieceProcessor())
    outputs.add("r", SamplingParams(stop=["lo wo"]))
    deltas, finishes = run(outputs, "r", [1, 2, 3, 4, 5])
    # The last 4 characters could start "lo wo": held back until "orld" completes it.
    assert [d.text for d in deltas] == ["", "h", "el", ""]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].token_ids == [4]  # the completing token is returned
    assert [d.finished for d in deltas] == [False, False, False, True]
    assert finishes[3] == {"stop": ["r"]} and finishes[:3] == [{}, {}, {}]
    assert finishes[4] == {}  # the token sampled after the match (a step in flight) is dropped
    assert [d.metrics for d in deltas[:3]] == [None] * 3  # clients get the times on the last delta
    assert deltas[-1].metrics.first_token_time == 3.0 and deltas[-1].metrics.finished_time is not None
    assert deltas[-1].num_generated_tokens == 4


def test_text_without_stop_strings_and_split_characters():
    outputs = OutputProcessor(PieceProcessor())
    outputs.add("r", SamplingParams())
    deltas, finishes = run(outputs, "r", [1, 6, 6, 5], last_finish="length")
    assert [d.text for d in deltas] == ["hel", "", "\N{SNOWMAN}", "!"]
    assert deltas[-1].finish_reason == "length" and all(f == {} for f in finishes)  # the engine's own end


def test_a_stop_string_in_the_last_token_is_counted_as_stop():
    outputs = OutputProcessor(PieceProcessor())
    outputs.add("r", SamplingParams(stop=["world"]))
    deltas, finishes = run(outputs, "r", [3, 4], last_finish="length")
    assert deltas[-1].finish_reason == "stop" and deltas[-1].text == " "
    assert finishes[-1] == {"stop": ["r"]}  # the engine counted "length": it must count "stop"


def test_a_failure_to_make_text_fails_only_that_request():
    class Broken(PieceDecoder):
        def push(self, token):
            raise UnicodeError("bad bytes")

    class Mixed(PieceProcessor):
        made = 0

        def stream_decoder(self):
            self.made += 1
            return Broken() if self.made == 2 else PieceDecoder()

    outputs = OutputProcessor(Mixed())
    for rid in "abc":
        outputs.add(rid, SamplingParams())
    deltas, finish = outputs.process([engine_delta(rid, 1) for rid in "abc"])
    assert [d.text for d in deltas] == ["hel", "", "hel"]
    bad = deltas[1]
    assert bad.finish_reason == "error" and bad.error_code == "internal_error" and "UnicodeError" in bad.error
    assert bad.token_ids == [] and bad.metrics is not None
    assert finish == {"error": ["b"]}
    assert outputs.process([engine_delta("b", 2)]) == ([], {})  # ended: the rest is dropped


def test_an_engine_error_ends_the_stream_without_held_back_text():
    outputs = OutputProcessor(PieceProcessor())
    outputs.add("r", SamplingParams(stop=["lo!"]))
    outputs.process([engine_delta("r", 1), engine_delta("r", 2)])  # "hello": "lo" held back
    failed = OutputDelta("r", finish_reason="error", error="internal error: boom", error_code="internal_error",
                         metrics=RequestMetrics(1.0, 2.0, 3.0, 4.0))
    (delta,), finish = outputs.process([failed])
    assert delta.text == "" and delta.error == "internal error: boom" and finish == {}


# ---------------------------------------------------------------------------------------- with the engine
CONV = [user("Tell me a story about a lighthouse.")]


@pytest.fixture(scope="module")
def base(model, processor):
    return chat(model, processor, CONV, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))


def stop_word(processor, tokens: list[int]) -> tuple[str, int]:
    """A word of the answer, and how many tokens it takes for the text to contain it."""
    word = processor.decode(tokens[2:4]).strip()
    return word, next(k for k in range(1, len(tokens) + 1) if word in processor.decode(tokens[:k]))


def test_a_stop_string_frees_the_engines_blocks_and_counts_as_stop(model, processor, base):
    engine = Engine(model, processor, EngineConfig(num_blocks=64))
    outputs = OutputProcessor(processor)
    word, needed = stop_word(processor, base.token_ids)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[word])
    rid = engine.add_request(chat_prompt(processor, CONV), params)
    outputs.add(rid, params)
    text = ""
    for _ in range(needed):
        deltas, finish = outputs.process(engine.step())
        text += "".join(d.text for d in deltas)
    assert finish == {"stop": [rid]} and deltas[-1].finish_reason == "stop"
    assert engine.stats().kv_blocks_used > 0 and engine.has_unfinished()  # until the engine is told
    engine.finish_requests(finish["stop"], "stop")
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and not engine.has_unfinished()
    assert stats.requests_finished_total == {"stop": 1, "length": 0, "abort": 0, "error": 0}
    assert text == base.text.split(word)[0] and deltas[-1].num_generated_tokens == needed
    engine.finish_requests([rid], "stop")  # told twice (or after an abort): nothing happens
    assert engine.stats().requests_finished_total["stop"] == 1


def test_a_stop_string_in_the_last_allowed_token_counts_as_stop(model, processor, base):
    llm = LLM.from_model(model, processor, num_blocks=64)
    word, needed = stop_word(processor, base.token_ids)
    out = llm.chat(CONV, SamplingParams(temperature=0, max_tokens=needed, ignore_eos=True, stop=[word]))[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text == base.text.split(word)[0]
    assert out.num_generated_tokens == needed and out.metrics.finished_time is not None
    stats = llm.engine.stats()
    assert stats.requests_finished_total == {"stop": 1, "length": 0, "abort": 0, "error": 0}
    assert stats.kv_blocks_used == 0


def test_a_failure_to_make_text_fails_only_its_request_in_the_llm(model, processor, monkeypatch):
    llm = LLM.from_model(model, processor, num_blocks=128)
    convs = [[user(f"Question {i}?")] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = [o.outputs[0].text for o in llm.chat(convs, params)]

    class Broken:
        def __init__(self, decoder):
            self.decoder, self.pushed = decoder, 0

        def push(self, token):
            self.pushed += 1
            if self.pushed == 3:
                raise ValueError("no text for this token")
            return self.decoder.push(token)

        def flush(self):
            return self.decoder.flush()

    class SecondBroken:
        made = 0

        def stream_decoder(self):
            self.made += 1
            return Broken(processor.stream_decoder()) if self.made == 2 else processor.stream_decoder()

    monkeypatch.setattr(llm.outputs, "processor", SecondBroken())
    outs = llm.chat(convs, params)
    assert outs[1].error_code == "internal_error" and "no text for this token" in outs[1].error
    assert outs[1].outputs[0].finish_reason == "error"
    assert [outs[0].outputs[0].text, outs[2].outputs[0].text] == [alone[0], alone[2]]
    stats = llm.engine.stats()
    assert stats.kv_blocks_used == 0 and stats.requests_finished_total["error"] == 1
    assert stats.requests_finished_total["abort"] == 0


def test_async_engine_stop_strings_end_requests_in_the_engine(model, processor, base):
    engine = AsyncEngine(Engine(model, processor, EngineConfig(num_blocks=128, max_num_seqs=4)))
    word, _ = stop_word(processor, base.token_ids)
    stopped = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, stop=[word])
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(engine.submit(chat_prompt(processor, CONV), p).result()
                                      for p in (stopped, plain, stopped)))

    try:
        first, second, third = asyncio.run(main())
        for out in (first, third):
            assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text == base.text.split(word)[0]
        assert second.outputs[0].text == base.text and second.outputs[0].finish_reason == "length"
        deadline = time.monotonic() + 10
        while engine.engine.has_unfinished():  # the finish commands are on their way to the engine thread
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stats = engine.stats()
        assert stats.kv_blocks_used == 0 and stats.num_running == 0
        assert stats.requests_finished_total == {"stop": 2, "length": 1, "abort": 0, "error": 0}
    finally:
        engine.shutdown()
