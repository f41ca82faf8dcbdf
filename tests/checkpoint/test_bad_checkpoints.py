"""A bad checkpoint fails fast, before large allocations, with one message naming file and key."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixtral.checkpoint import load_model, save_model
from pixtral.errors import CheckpointError, ConfigError
from pixtral.checkpoint.configs import params_json
from pixtral.model import preset
from tests.conftest import random_model


@pytest.fixture
def ckpt(tmp_path):
    return save_model(random_model("tiny"), tmp_path / "ok")


def test_missing_key(ckpt):
    f = ckpt / "consolidated.safetensors"
    t = load_file(str(f))
    del t["layers.1.feed_forward.w2.weight"]
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match="missing tensor 'layers.1.feed_forward.w2.weight'"):
        load_model(ckpt)


def test_unexpected_key(ckpt):
    f = ckpt / "consolidated.safetensors"
    t = load_file(str(f))
    t["layers.9.attention.wq.weight"] = torch.zeros(2, 2)
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match="consolidated.safetensors: unexpected tensor 'layers.9.attention.wq.weight'"):
        load_model(ckpt)


def test_wrong_shape(ckpt):
    f = ckpt / "consolidated.safetensors"
    t = load_file(str(f))
    t["norm.weight"] = torch.ones(65)
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"consolidated.safetensors: tensor 'norm.weight' has shape \[65\], but the config expects \[64\]"):
        load_model(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "consolidated.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="consolidated.safetensors: file is truncated: tensor '.*' ends at byte"):
        load_model(ckpt)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(ckpt)


def test_bad_config_values(ckpt):
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "vision_encoder": {**params["vision_encoder"], "patch_size": 0}}))
    with pytest.raises(ConfigError, match="params.json: 'vision_encoder.patch_size' must be a positive integer"):
        load_model(ckpt)
    (ckpt / "params.json").write_text("{not json")
    with pytest.raises(ConfigError, match="params.json: not valid JSON"):
        load_model(ckpt)


def test_missing_files(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path / "empty")
    (ckpt / "consolidated.safetensors").unlink()
    with pytest.raises(CheckpointError, match="params.json found but no consolidated"):
        load_model(ckpt)


def test_12b_config_fails_before_allocating(tmp_path, ckpt):
    """A 12B params.json over tiny weights: building the model would need ~49 GB; the error comes first."""
    (ckpt / "params.json").write_text(json.dumps(params_json(preset("pixtral-12b-2409"))))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="has shape .* but the config expects"):
        load_model(ckpt)
    assert time.monotonic() - start < 10


def test_hf_missing_key_names_hf_key(tmp_path):
    hf = save_model(random_model("tiny"), tmp_path / "hf", layout="hf")
    t = load_file(str(hf / "model.safetensors"))
    del t["vision_tower.ln_pre.weight"]
    save_file(t, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor 'vision_tower.ln_pre.weight'"):
        load_model(hf)
