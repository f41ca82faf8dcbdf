"""Fixtures: the tiny model and its processor, built once per session."""

from __future__ import annotations

import pytest
import torch
from tiny_model import build_checkpoint

from pixtral.checkpoint import load_model
from pixtral.processing import load_processor


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("engine") / "tiny")


@pytest.fixture(scope="session")
def model(tiny_dir):
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and immune to busy neighbours
    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def processor(tiny_dir):
    return load_processor(tiny_dir)
