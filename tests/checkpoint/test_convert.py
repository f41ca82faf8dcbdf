"""Conversion between layouts: bit-exact round trips, sharding, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pixtral.checkpoint import convert_checkpoint, load_model, save_model
from pixtral.checkpoint import save as save_module
from pixtral.checkpoint.layout import from_hf_rows, to_hf_rows
from pixtral.cli.main import main
from tests.conftest import random_model


def tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny-small-3.1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, name, dtype):
    model = random_model(name).to(dtype)
    src = save_model(model, tmp_path / "mistral")
    hf = convert_checkpoint(src, tmp_path / "hf", to="hf")
    back = convert_checkpoint(hf, tmp_path / "back", to="mistral")
    a, b = tensors(src), tensors(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert json.loads((src / "params.json").read_text()) == json.loads((back / "params.json").read_text())
    # The HF side really is permuted (rotate_half order), and only q/k are.
    h = tensors(hf)
    q_mistral = a["layers.0.attention.wq.weight"]
    q_hf = h["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q_mistral, q_hf)
    assert torch.equal(q_hf, to_hf_rows(q_mistral, model.args.n_heads, model.args.head_dim))
    assert torch.equal(h["language_model.model.layers.0.self_attn.v_proj.weight"], a["layers.0.attention.wv.weight"])


def test_permutation_is_the_spec_one():
    w = torch.arange(2 * 8).reshape(2 * 8, 1)  # 2 heads of head_dim 8
    perm = to_hf_rows(w, 2, 8)[:, 0].tolist()
    assert perm == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(from_hf_rows(to_hf_rows(w, 2, 8), 2, 8), w)


def test_sharded_hf_output_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(save_module, "HF_SHARD_BYTES", 8 * 2**20)
    model = random_model("tiny")
    out = save_model(model, tmp_path / "hf", layout="hf")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = torch.tensor([1, 3, 500, 4])
    assert torch.equal(load_model(out)(ids), model(ids))


def test_legacy_and_current_hf_prefixes_both_load(tmp_path):
    from safetensors.torch import save_file

    model = random_model("tiny")
    hf = save_model(model, tmp_path / "hf", layout="hf")
    renamed = {}
    for k, v in tensors(hf).items():
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        k = k.replace("vision_tower.", "model.vision_tower.").replace("multi_modal_projector.", "model.multi_modal_projector.")
        renamed[k] = v
    save_file(renamed, str(hf / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.tensor([1, 3, 500, 4])
    assert torch.equal(load_model(hf)(ids), model(ids))


def test_cli_convert(tmp_path, capsys):
    src = save_model(random_model("tiny"), tmp_path / "m")
    assert main(["convert", str(src), str(tmp_path / "h"), "--to", "hf"]) == 0
    assert (tmp_path / "h" / "config.json").is_file()
    # An existing, non-empty destination is never overwritten by accident.
    assert main(["convert", str(src), str(tmp_path / "h"), "--to", "hf"]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err


def test_a_patch_merger_without_its_norm_is_refused_in_the_hf_layout(tmp_path, capsys):
    """transformers' Mistral3 projector (the only HF class with a patch merger) always applies the
    pre-projector norm: a model without it keeps the Mistral layout, and asking for the HF layout
    fails before anything is written, naming the setting."""
    import dataclasses

    from pixtral.errors import ConfigError
    from pixtral.model import Pixtral
    from pixtral.model import preset

    args = preset("tiny")
    args.vision = dataclasses.replace(args.vision, spatial_merge_size=2, mm_projector_id="patch_merge",
                                      add_pre_mm_projector_layer_norm=False)
    model = Pixtral(args)
    with pytest.raises(ConfigError, match="add_pre_mm_projector_layer_norm"):
        save_model(model, tmp_path / "hf", layout="hf")
    assert not (tmp_path / "hf").exists()
    save_model(model, tmp_path / "mistral")
    assert not load_model(tmp_path / "mistral").args.vision.add_pre_mm_projector_layer_norm
    assert main(["convert", str(tmp_path / "mistral"), str(tmp_path / "hf"), "--to", "hf"]) != 0
    assert "add_pre_mm_projector_layer_norm" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_no_path_loads_the_embedded_default_model():
    from pixtral.assets import default_model_dir

    default, explicit = load_model(), load_model(default_model_dir())
    assert default.args == explicit.args
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
