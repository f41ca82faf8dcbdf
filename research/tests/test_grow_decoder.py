"""research/scripts/grow_decoder.py: the grown model computes what the source did, then trains its new layers."""

from __future__ import annotations

import json

import pytest
import torch

from pixtral.checkpoint import load_model
from conftest import load_script


@pytest.fixture(scope="module")
def grow():
    return load_script("grow_decoder")


def test_grown_model_gives_the_same_logits(grow, tiny_checkpoint, tmp_path):
    src = load_model(tiny_checkpoint, "cpu", torch.float32).eval()
    grow.main(["--src", str(tiny_checkpoint), "--dst", str(tmp_path / "g"), "--after", "0", str(src.args.n_layers - 1)])
    grown = load_model(tmp_path / "g", "cpu", torch.float32).eval()
    assert grown.args.n_layers == src.args.n_layers + 2
    assert json.loads((tmp_path / "g" / "params.json").read_text())["n_layers"] == src.args.n_layers + 2
    assert (tmp_path / "g" / "tekken.json").is_file()
    # The source layers keep their weights, in order: new layer 1 sits between old layers 0 and 1.
    assert torch.equal(grown.layers[0].attention.wq.weight, src.layers[0].attention.wq.weight)
    assert torch.equal(grown.layers[2].attention.wq.weight, src.layers[1].attention.wq.weight)
    assert grown.layers[1].attention.wq.weight.abs().sum() > 0  # new, random: it can learn
    ids = torch.randint(0, src.args.vocab_size, (24,))
    with torch.no_grad():
        a, b = src(ids), grown(ids)
    assert a.abs().max() > 1  # logits that a wrong model could not match by accident
    assert torch.equal(a, b)


def test_new_layers_get_gradients(grow, tiny_checkpoint, tmp_path):
    grow.main(["--src", str(tiny_checkpoint), "--dst", str(tmp_path / "g"), "--after", "0"])
    model = load_model(tmp_path / "g", "cpu", torch.float32).requires_grad_(True)
    ids = torch.randint(0, model.args.vocab_size, (16,))
    model(ids).logsumexp(-1).sum().backward()
    assert model.layers[1].attention.wo.weight.grad.abs().sum() > 0
    assert model.layers[1].feed_forward.w2.weight.grad.abs().sum() > 0


def test_rejects_layers_the_source_does_not_have(grow, tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match=r"--after: each layer once, in 0\.\.1"):
        grow.main(["--src", str(tiny_checkpoint), "--dst", str(tmp_path / "g"), "--after", "7"])
    with pytest.raises(SystemExit, match="exists and is not empty"):
        grow.main(["--src", str(tiny_checkpoint), "--dst", str(tiny_checkpoint), "--after", "0"])
    with pytest.raises(SystemExit, match="no params.json"):
        grow.main(["--src", str(tmp_path), "--dst", str(tmp_path / "g"), "--after", "0"])
