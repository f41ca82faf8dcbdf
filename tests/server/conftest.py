"""Fixtures: the tiny model, and a live server over it shared by the server tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # the shared tiny model builder
from live_server import start  # noqa: E402
from tiny_model import build_checkpoint  # noqa: E402

from pixtral.checkpoint import load_model  # noqa: E402
from pixtral.engine import EngineConfig  # noqa: E402
from pixtral.processing import load_processor  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("server") / "tiny")


@pytest.fixture(scope="session")
def model(tiny_dir):
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and immune to busy neighbours
    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def processor(tiny_dir):
    return load_processor(tiny_dir)


@pytest.fixture(scope="session")
def server(model, processor):
    live, engine = start(model, processor, EngineConfig(num_blocks=1024, max_num_seqs=64))
    yield live
    live.stop()
    engine.shutdown()
