"""The engine in its background thread, driven from asyncio."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from tiny_model import image_uri, user

from pixtral.engine import AsyncEngine, Engine, EngineConfig, QueueFullError
from pixtral.engine.inputs import chat_prompt
from pixtral.errors import ContextLengthError
from pixtral.generation import SamplingParams, chat


@pytest.fixture
def async_engine(model, processor, request):
    # Two run at once and two may wait (the queue test relies on these limits).
    config = EngineConfig(num_blocks=128, max_num_seqs=2, max_waiting=getattr(request, "param", 2))
    engine = AsyncEngine(Engine(model, processor, config))
    yield engine
    engine.shutdown()


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("async_engine", [16], indirect=True)
def test_streams_match_reference(async_engine, model, processor):
    convs = [[user("What do you see?", image_uri(i))] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=8)

    async def one(conv):
        pieces, last = [], None
        async for delta in async_engine.chat(conv, params):
            pieces.append(delta.text)
            last = delta
        return "".join(pieces), last

    async def main():
        return await asyncio.gather(*(one(c) for c in convs))

    for (text, last), conv in zip(asyncio.run(main()), convs):
        ref = chat(model, processor, conv, params)
        assert text == ref.text and last.finish_reason == ref.finish_reason
        assert last.num_prompt_tokens == ref.prompt_tokens
    wait_until(lambda: async_engine.stats().kv_blocks_used == 0)


def test_leaving_a_stream_aborts_and_frees_blocks(async_engine, processor):
    prompt = chat_prompt(processor, [user("Tell me everything. " * 20)])

    async def main():
        stream = async_engine.submit(prompt, SamplingParams(temperature=0, max_tokens=900, ignore_eos=True))
        deltas = aiter(stream)
        while not (await anext(deltas)).token_ids:
            pass
        await deltas.aclose()  # the client goes away (what a cancelled or collected iterator does)

    asyncio.run(main())
    wait_until(lambda: async_engine.stats().num_running == 0)
    stats = async_engine.stats()
    assert stats.kv_blocks_used == 0 and stats.requests_finished_total.get("abort") == 1


def test_bad_request_and_full_queue_are_refused_at_submit(async_engine, processor):
    prompt = chat_prompt(processor, [user("Hello there")])
    long = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
    gate = threading.Event()
    gate.set()
    real_step = async_engine.engine.step
    async_engine.engine.step = lambda: gate.wait() and real_step()

    async def main():
        with pytest.raises(ContextLengthError):
            async_engine.submit(prompt, SamplingParams(max_tokens=10**6))
        # max_num_seqs=2 run, max_waiting=2 wait: the fifth is refused.
        streams = [async_engine.submit(prompt, long) for _ in range(2)]
        for _ in range(1000):  # until both run
            if async_engine.stats().num_running == 2:
                break
            await asyncio.sleep(0.01)
        gate.clear()  # hold the engine: the two run, the next two wait
        streams += [async_engine.submit(prompt, long) for _ in range(2)]
        with pytest.raises(QueueFullError):
            async_engine.submit(prompt, long)
        gate.set()
        for s in streams:
            s.abort()

    asyncio.run(main())
    wait_until(lambda: not async_engine.engine.has_unfinished())
    assert async_engine.stats().kv_blocks_used == 0


def test_deltas_waiting_together_are_handed_out_as_one(async_engine):
    """A consumer that fell behind gets what is queued in one delta; an error or exception is never merged in."""
    from pixtral.engine.async_engine import RequestStream
    from pixtral.engine.outputs import OutputDelta, TokenLogprob
    from pixtral.engine.request import Prompt

    def delta(token, **kw):
        return OutputDelta("r", text=f"<{token}>", token_ids=[token], logprobs=[TokenLogprob(token, -1.0)],
                           num_generated_tokens=token, **kw)

    async def consume(items):
        stream = RequestStream(async_engine, "r", Prompt([1]), SamplingParams(logprobs=0))
        for item in items:
            stream._queue.put_nowait(item)
        got = []
        try:
            async for d in stream:
                got.append(d)
        except RuntimeError as exc:
            got.append(exc)
        return got

    got = asyncio.run(consume([delta(1), delta(2), delta(3, finish_reason="length"), delta(4)]))
    assert len(got) == 1
    assert (got[0].text, got[0].token_ids, got[0].finish_reason) == ("<1><2><3>", [1, 2, 3], "length")
    assert [lp.token_id for lp in got[0].logprobs] == [1, 2, 3] and got[0].num_generated_tokens == 3

    error = OutputDelta("r", finish_reason="error", error="boom", error_code="internal_error")
    got = asyncio.run(consume([delta(1), delta(2), error]))
    assert [(d.text, d.error) for d in got] == [("<1><2>", None), ("", "boom")]  # the error stands alone

    got = asyncio.run(consume([delta(1), RuntimeError("engine died"), delta(2)]))
    assert got[0].text == "<1>" and isinstance(got[1], RuntimeError)
