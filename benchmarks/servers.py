"""Starting and waiting for local servers, shared by the serving benchmarks (loopback only)."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


class NotReady(RuntimeError):
    """A server exited, or did not answer /health in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    """Until `url`/health answers 200; NotReady if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise NotReady(f"the server at {url} exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise NotReady(f"{url} was not ready within {timeout:g} s")
