"""`AsyncEngine`: the engine in a background thread, with asyncio streams (what the server uses).

    engine = AsyncEngine.from_pretrained(path)          # loads the model, starts the thread
    async for delta in engine.chat(messages, SamplingParams(max_tokens=64)):
        print(delta.text, end="")

The engine thread owns the `Engine` and does nothing but step it: other threads only send it
commands (add, abort, finish) through a queue. After each step it hands the token-level outputs
to the event loop of each request's `RequestStream` (`loop.call_soon_threadsafe`, once a step
per loop); there the `OutputProcessor` makes the text and applies stop strings while the
engine runs its next step, and a stop string's finish goes back to the engine as a command.
`submit` checks a request and refuses it at once (a bad request, a full queue, a dead engine)
so a server can answer with the right status before it starts streaming. A stream that is
abandoned or closed aborts its request, which frees its KV blocks at the engine's next step.
A request with `n` > 1 choices is one stream: its deltas carry their choice's `index`, and it ends
when every choice has (or one fails).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pixtral.engine.engine import Engine, EngineStats
from pixtral.engine.executor import TensorParallelError
from pixtral.engine.inputs import chat_prompt, generate_prompt
from pixtral.engine.output_processor import OutputProcessor
from pixtral.engine.outputs import OutputDelta, RequestOutput
from pixtral.engine.request import Prompt
from pixtral.errors import PixtralError
from pixtral.generation.params import SamplingParams
from pixtral.processing.images import ImagePolicy

log = logging.getLogger("pixtral.engine")


class QueueFullError(PixtralError):
    """Too many requests are waiting; try again later (HTTP 429)."""


class EngineDeadError(PixtralError):
    """The engine thread stopped; no request can be served (HTTP 503)."""


class RequestStream:
    """Async iterator over one request's `OutputDelta`s; `abort()` cancels the request."""

    def __init__(self, owner: "AsyncEngine", request_id: str, prompt: Prompt, params: SamplingParams):
        self._owner, self.request_id = owner, request_id
        self.prompt, self.params = prompt, params
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.done = False
        self._open = params.n  # choices not finished (on the stream's event loop: `AsyncEngine._process`)
        self._unread = params.n  # choices whose last delta the consumer has not had

    def _put(self, item: OutputDelta | BaseException) -> None:  # from another thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[OutputDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[OutputDelta]:
        held = None  # an item taken from the queue but not merged: the next one to hand out
        try:
            while not self.done:
                item, held = (held, None) if held is not None else (await self._queue.get(), None)
                if isinstance(item, BaseException):
                    self.done = True
                    raise item
                # Deltas of one choice that came while the consumer was busy go out as one: a server that
                # falls behind the engine writes one event per turn, not one per token, and so catches up.
                while not item.finished and not self._queue.empty():
                    later = self._queue.get_nowait()
                    if (isinstance(later, BaseException) or later.error is not None
                            or later.request_id != item.request_id):
                        held = later
                        break
                    item.extend(later)
                self._unread -= item.finished
                self.done = self._unread == 0 or item.error is not None  # one failed choice ends the request
                yield item
        finally:
            self.abort()

    async def result(self) -> RequestOutput:
        """Wait for the whole answer."""
        out = RequestOutput.start(self.request_id, self.prompt.token_ids, self.params.logprobs is not None,
                                  self.params.n)
        async for delta in self:
            out.add(delta)
        return out

    def abort(self) -> None:
        """Cancel the request if it is still running (idempotent)."""
        if not self.done:
            self.done = True
            self._owner._abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine, start: bool = True):
        self.engine = engine
        self.outputs = OutputProcessor(engine.processor)  # used on the streams' event loops
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._pending_adds = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None
        _ = engine.processor.max_token_bytes  # the text-length bound, computed now rather than on the first request
        if engine.executor is not None:  # a tensor-parallel worker that dies ends the engine at once
            engine.executor.add_failure_callback(self._workers_failed)
        if start:
            self.start()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device=None, dtype=None, *,
                        image_policy: ImagePolicy | None = None, quantization: str | None = None,
                        **engine_options: Any) -> "AsyncEngine":
        from pixtral.engine.llm import LLM

        kwargs = {"image_policy": image_policy} if image_policy is not None else {}
        llm = LLM(path, device, dtype, quantization=quantization, **kwargs, **engine_options)  # warmed up (GPU graphs captured)
        return cls(llm.engine)

    # ------------------------------------------------------------------ properties
    @property
    def processor(self):
        return self.engine.processor

    @property
    def max_model_len(self) -> int:
        return min(self.engine.max_model_len, self.engine.kv_capacity)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._pending_adds

    def model_info(self) -> dict:
        return self.engine.model_info()

    def stats(self) -> EngineStats:
        stats = self.engine.stats()  # plain counters, read without locking: a snapshot may be a step old
        stats.num_waiting += self._pending_adds
        return stats

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pixtral-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, then the tensor-parallel workers if any."""
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            # A thread caught in a step with a dead rank gets out when the workers are stopped below.
            self._thread.join(timeout if self.dead is None else min(timeout, 1.0))
        self.engine.close()

    def on_worker_failure(self, callback) -> None:
        """Call `callback(error)` once, from another thread, if a tensor-parallel worker dies or falls out
        of step (the engine is dead by then: `alive` is False). Never called with one process."""
        if self.engine.executor is not None:
            self.engine.executor.add_failure_callback(callback)

    def _workers_failed(self, error: BaseException) -> None:
        """(the executor's watcher thread) Dead at once: /health answers 503 and every stream ends."""
        if self.dead is None:
            self.dead = error
        self._fail_streams()
        self._commands.put(("wake", None))

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Check and enqueue a request; raises RequestError, QueueFullError or EngineDeadError."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running{f' ({self.dead})' if self.dead else ''}")
        self.engine.check(prompt, params)
        limit = self.engine.config.max_waiting
        with self._lock:
            if self.num_waiting >= limit:
                raise QueueFullError(f"the server has {limit} requests waiting, its limit; retry later")
            self._pending_adds += 1
        stream = RequestStream(self, request_id or uuid.uuid4().hex, prompt, params)
        self.outputs.add(stream.request_id, params)
        self._streams[stream.request_id] = stream
        self._send(("add", stream))
        return stream

    async def generate(self, prompt: Any, params: SamplingParams, request_id: str | None = None
                       ) -> AsyncIterator[OutputDelta]:
        """Stream the deltas of a raw prompt (see `LLM.generate` for the accepted forms)."""
        stream = self.submit(generate_prompt(self.processor, prompt), params, request_id)
        async for delta in stream:
            yield delta

    async def chat(self, messages: list[dict], params: SamplingParams, request_id: str | None = None,
                   policy: ImagePolicy | None = None) -> AsyncIterator[OutputDelta]:
        """Stream the deltas of an OpenAI-format conversation (images decoded off the event loop)."""
        prompt = await asyncio.to_thread(chat_prompt, self.processor, messages, policy, self.max_model_len)
        stream = self.submit(prompt, params, request_id)
        async for delta in stream:
            yield delta

    def _abort(self, request_id: str) -> None:
        self.outputs.abort(request_id)
        self._send(("abort", request_id))

    # ------------------------------------------------------------------ event loops
    def _process(self, outputs: list[OutputDelta]) -> None:
        """On a streams' event loop: make the text of one step's outputs and hand it to the streams."""
        deltas, finish = self.outputs.process(outputs)
        for reason, ids in finish.items():
            self._send(("finish", (ids, reason)))
        for delta in deltas:
            stream = self._streams.get(delta.owner)
            if stream is None:
                continue
            stream._open -= delta.finished
            if stream._open == 0 or delta.error is not None:
                self._streams.pop(delta.owner, None)
            stream._queue.put_nowait(delta)

    # ------------------------------------------------------------------ engine thread
    def _send(self, command: tuple) -> None:
        self._commands.put(command)

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.dead is None:
                self._take_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._hand_over(self.engine.step())
        except BaseException as exc:  # noqa: BLE001 - report it to every waiting client
            if isinstance(exc, TensorParallelError):  # a rank is gone: said by the executor already
                log.error("the engine thread stopped: %s", exc)
            else:
                log.exception("the engine thread died")
            if self.dead is None:
                self.dead = exc
        finally:
            self._fail_streams()

    def _fail_streams(self) -> None:
        error = EngineDeadError(f"the engine stopped{f': {self.dead}' if self.dead else ''}")
        for stream in list(self._streams.values()):
            self.outputs.abort(stream.request_id)
            try:
                stream._put(error)
            except RuntimeError:  # that client's event loop is gone
                pass
        self._streams.clear()

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: tuple) -> None:
        kind, arg = command
        if kind == "add":
            stream: RequestStream = arg
            try:
                if not stream.done:  # not abandoned meanwhile
                    self.engine.add_request(stream.prompt, stream.params, stream.request_id)
            except Exception as exc:  # noqa: BLE001 - the client gets the error, the engine goes on
                self._streams.pop(stream.request_id, None)
                self.outputs.abort(stream.request_id)
                stream._put(exc)
            finally:
                with self._lock:
                    self._pending_adds -= 1
        elif kind == "abort":
            self.engine.abort(arg)
            self._streams.pop(arg, None)
        elif kind == "finish":  # a stop string matched, or making the text failed
            self.engine.finish_requests(*arg)

    def _hand_over(self, outputs: list[OutputDelta]) -> None:
        """Send a step's outputs to their streams' event loops, one call per loop, to be made into text there."""
        by_loop: dict[asyncio.AbstractEventLoop, list[OutputDelta]] = {}
        for out in outputs:
            stream = self._streams.get(out.owner)
            if stream is not None:  # else its client left, or a stop string ended it
                by_loop.setdefault(stream._loop, []).append(out)
        for loop, outs in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._process, outs)
            except RuntimeError:  # that event loop is gone: nobody reads these requests
                for out in outs:
                    self.engine.abort(out.owner)
                    self._streams.pop(out.owner, None)
                    self.outputs.abort(out.owner)
