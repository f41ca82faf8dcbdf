"""Tokens to text, outside the engine's step loop: detokenizing and stop strings.

`Engine.step()` returns token-level deltas. The `OutputProcessor` keeps each request's stream
decoder and `StopStringMatcher`, and turns those deltas into the ones clients get: text added,
text held back while it could still become a stop string, times on the last delta only.

Ending a request is then sometimes its call, and the engine must be told (`Engine.finish_requests`):

- a stop string matched: the request ends with "stop", its text cut before the stop string;
- making its text failed: that request alone ends with an internal error.

After that, deltas of the request are dropped: a step may already have been under way when the
stop string matched (`AsyncEngine` detokenizes while the engine runs its next step).

Each request's deltas must be processed on one thread at a time; different requests may be on
different threads (`AsyncEngine` processes each stream's on its own event loop).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict

from pixtral.engine.outputs import OutputDelta
from pixtral.engine.request import child_ids
from pixtral.generation.params import SamplingParams
from pixtral.generation.stop import StopStringMatcher

log = logging.getLogger("pixtral.engine")


class _Detokenizer:
    """One request's text so far: the stream decoder, then the stop-string matcher over its text."""

    def __init__(self, decoder, stop: list[str]):
        self.decoder, self.stops = decoder, StopStringMatcher(stop)

    def push(self, token: int) -> str:
        return self.stops.push(self.decoder.push(token))

    def flush(self) -> str:
        return self.stops.push(self.decoder.flush()) + self.stops.flush()


class OutputProcessor:
    def __init__(self, processor):
        self.processor = processor  # gives each request a stream decoder (`processor.stream_decoder()`)
        self._requests: dict[str, _Detokenizer] = {}  # by the engine's ids: one per choice
        self._choices: dict[str, list[str]] = {}  # a request's choices not finished yet, by the client's id

    def add(self, request_id: str, params: SamplingParams) -> None:
        """Expect outputs for this request, all its choices (add it before the engine can produce any)."""
        ids = child_ids(request_id, params.n)
        self._choices[request_id] = ids
        for cid in ids:
            self._requests[cid] = _Detokenizer(self.processor.stream_decoder(), params.stop)

    def abort(self, request_id: str) -> None:
        """Forget a request (the client's id: all its choices): its client is gone, or the engine never took it."""
        for cid in self._choices.pop(request_id, [request_id]):
            self._requests.pop(cid, None)

    def process(self, outputs: list[OutputDelta]) -> tuple[list[OutputDelta], dict[str, list[str]]]:
        """The engine's token-level deltas -> (deltas for the clients, {reason: ids} the engine must finish).

        The engine deltas are completed in place and returned; those of requests that ended here
        or were aborted are dropped.
        """
        deltas: list[OutputDelta] = []
        finish: dict[str, list[str]] = defaultdict(list)
        for out in outputs:
            detok = self._requests.get(out.request_id)
            if detok is None:
                continue  # it ended here (a stop string) or was aborted: what came after is dropped
            engine_reason = out.finish_reason
            try:
                self._add_text(detok, out)
            except Exception as exc:  # noqa: BLE001 - this request cannot be turned into text; the others can
                log.exception("making the text of request %s failed", out.request_id)
                out = dataclasses.replace(out, text="", token_ids=[], logprobs=None, finish_reason="error",
                                          error_code="internal_error",
                                          error=f"internal error: {type(exc).__name__}: {exc}")
            if out.finished:
                self._requests.pop(out.request_id, None)  # (an engine thread may have dropped it already)
                self._forget_choice(out.owner, out.request_id)
                if out.finish_reason != engine_reason:
                    finish[out.finish_reason].append(out.request_id)
                if out.metrics is not None and out.metrics.finished_time is None:
                    out.metrics = dataclasses.replace(out.metrics, finished_time=time.monotonic())
            else:
                out.metrics = None  # clients get the times with the last delta
            deltas.append(out)
        return deltas, dict(finish)

    def _forget_choice(self, request_id: str, choice_id: str) -> None:
        left = self._choices.get(request_id)
        if left is not None and choice_id in left:
            left.remove(choice_id)
            if not left:
                del self._choices[request_id]

    @staticmethod
    def _add_text(detok: _Detokenizer, out: OutputDelta) -> None:
        for i, token in enumerate(out.token_ids):
            out.text += detok.push(token)
            if detok.stops.stopped:  # tokens after the one that completed the stop string are not returned
                del out.token_ids[i + 1:]
                if out.logprobs is not None:
                    del out.logprobs[i + 1:]
                out.finish_reason = "stop"
                break
        if out.finished and out.error is None:  # an error delta ends the stream without more text
            out.text += detok.flush()
