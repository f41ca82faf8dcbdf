"""Fixtures: the tiny model, and a live server over it shared by the server tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # the shared tiny model builder
from live_server import start  # noqa: E402
from tiny_model import model, processor, tiny_dir  # noqa: E402, F401

from pixtral.engine import EngineConfig  # noqa: E402


@pytest.fixture(scope="session")
def server(model, processor):
    live, engine = start(model, processor, EngineConfig(num_blocks=1024, max_num_seqs=64))
    yield live
    live.stop()
    engine.shutdown()
