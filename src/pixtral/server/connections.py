"""Connection limits for uvicorn: idle and slow clients cannot starve the others.

uvicorn bounds neither how many connections it holds nor how long a client may take to send a
request's headers, so a flood of half-sent requests (slowloris) holds every file descriptor
until no new client gets in. `GuardedH11Protocol` is uvicorn's own h11 protocol with three
additions:

- a deadline for each request's headers (from the connection's start, then from the end of the
  previous response): a client that has not sent a whole request head by then is answered 408
  and closed;
- a cap on open connections: a connection over the cap closes the one that has been idle the
  longest (waiting between requests or still sending headers), so idle clients can never keep
  out a new one; when every connection is running a request, the newcomer gets a 503;
- nothing else changes: keep-alive, pipelining and flow control stay uvicorn's.

`LoopErrorLog` logs the event loop's errors once per interval and kind, not once per
connection: a failing `accept()` (out of file descriptors) would otherwise log a traceback per
attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("pixtral.server")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024  # open connections, idle or busy
    header_timeout_s: float = 10.0  # to send a whole request head
    keep_alive_s: float = 5.0  # idle time between requests on one connection


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "service_unavailable", "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    limits = ConnectionLimits()  # set per server by `protocol_class`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._got_data = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_deadline()
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        """A request is in progress on this connection (its head arrived, its response is not done)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_deadline(self) -> None:
        self._idle_since = time.monotonic()
        self._got_data = False
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    # ------------------------------------------------------------------ uvicorn hooks
    def data_received(self, data: bytes) -> None:
        self._got_data = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.busy:
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.busy:  # (a pipelined request may be running now)
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    # ------------------------------------------------------------------ limits
    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self.busy or self.transport.is_closing():
            return
        if self._got_data:  # a request was started but its head never finished
            self.transport.write(_raw_response(
                408, "Request Timeout", f"the request headers did not arrive within "
                f"{self.limits.header_timeout_s:g} s", "request_timeout"))
        self.transport.close()

    def _make_room(self) -> None:
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and not c.busy and not c.transport.is_closing()]
        if idle:
            oldest = min(idle, key=lambda c: c._idle_since)
            oldest._disarm_header_deadline()
            oldest.transport.close()
            return
        self._disarm_header_deadline()
        self.transport.write(_raw_response(
            503, "Service Unavailable", f"the server has {self.limits.max_connections} connections running "
            "requests, its limit; retry later", "too_many_connections"))
        self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """`GuardedH11Protocol` with these limits (uvicorn takes a class, one per server)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def uvicorn_config(app, limits: ConnectionLimits, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(app, http=protocol_class(limits), timeout_keep_alive=int(max(1, limits.keep_alive_s)),
                          loop="asyncio", **options)


class LoopErrorLog:
    """An asyncio exception handler that logs each kind of error at most once per `interval_s`,
    with the count of those it held back, and a traceback only the first time."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        kind = f"{context.get('message', 'event loop error')}: {type(exc).__name__ if exc else ''}"
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._held[kind] += 1
            return
        held = self._held.pop(kind, 0)
        self._last[kind] = now
        more = f" ({held} more like it in the last {self.interval_s:g} s)" if held else ""
        log.error("%s%s%s", context.get("message", "event loop error"), f": {exc}" if exc else "", more,
                  exc_info=exc if last is None and exc is not None else None)


async def serve(server: uvicorn.Server, sockets=None) -> None:
    """Run a uvicorn server with the event loop's errors logged by `LoopErrorLog`."""
    asyncio.get_running_loop().set_exception_handler(LoopErrorLog())
    await server.serve(sockets=sockets)


def run(server: uvicorn.Server, sockets=None) -> None:
    asyncio.run(serve(server, sockets))


def raise_file_limit(max_connections: int) -> int:
    """Raise the soft limit on open files to the hard one; return how many connections fit under it.

    Each connection is a file descriptor; the model's files, the log and the event loop need some
    more (kept back here), so the connection cap must stay below the limit or accept() fails.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return min(max_connections, max(16, soft - 256))
