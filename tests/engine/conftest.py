"""Fixtures: the tiny model and its processor, built once per session (defined in tiny_model.py)."""

from tiny_model import model, processor, tiny_dir  # noqa: F401
