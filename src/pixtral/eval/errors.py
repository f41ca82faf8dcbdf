"""Evaluation errors that reach users (printed as one line by the CLI)."""

from __future__ import annotations

from pixtral.errors import PixtralError


class DataError(PixtralError, ValueError):
    """A dataset file is missing, unreadable, or lacks a field the task needs."""


class EndpointUnreachableError(PixtralError, ConnectionError):
    """The model or judge endpoint cannot be reached at all (connection refused, DNS, ...)."""


class BackendError(PixtralError, RuntimeError):
    """The model under test cannot be set up (missing engine, bad options)."""


class ResumeError(PixtralError, ValueError):
    """Existing per-item results in the output directory belong to a different run."""
