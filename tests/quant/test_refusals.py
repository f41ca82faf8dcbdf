"""Quantized checkpoints we cannot run are refused, naming the file and the scheme, before any weight is read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixtral.checkpoint import load_model
from pixtral.errors import CheckpointError, ConfigError
from pixtral.parallel import load_tp_model
from tests.parallel.conftest import random_pixtral, tp_args
from tests.quant import fp8_writers as w


@pytest.fixture
def ct(tmp_path):
    """A valid compressed-tensors fp8 checkpoint (per channel) to break in one way per test."""
    root = tmp_path / "ct"
    w.write_compressed_tensors(random_pixtral(tp_args("hf_kv2")), root, "channel")
    return root


def edit_config(root, change):
    config = json.loads((root / "config.json").read_text())
    change(config)
    (root / "config.json").write_text(json.dumps(config))


def edit_tensors(root, change):
    tensors = load_file(str(root / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(root / "model.safetensors"))


GROUP = "quantization_config.config_groups.group_0"
INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}


@pytest.mark.parametrize("quantization_config,named", [
    ({"quant_method": "gptq", "bits": 4}, r"GPTQ \(quant_method 'gptq'\)"),
    ({"quant_method": "awq", "bits": 4}, r"AWQ"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, r"bitsandbytes"),
    ({"quant_method": "mystery"}, r"quantization scheme 'mystery'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, r"fp8 scale_fmt 'ue8m0'"),
    ({"quant_method": "fp8", "activation_scheme": "per-tensor"}, r"fp8 activation_scheme 'per-tensor'"),
])
def test_other_methods(ct, quantization_config, named):
    edit_config(ct, lambda c: c.update(quantization_config=quantization_config))
    with pytest.raises(ConfigError, match=named) as err:
        load_model(ct)
    assert str(ct / "config.json") in str(err.value)


@pytest.mark.parametrize("change,named", [
    (lambda q: q["config_groups"]["group_0"].update(weights=INT8), r"weights int 8-bit"),
    (lambda q: q["config_groups"]["group_0"].update(weights={**INT8, "num_bits": 4}), r"weights int 4-bit"),
    (lambda q: q.update(format="pack-quantized"), r"format 'pack-quantized'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=128),
     r"weights strategy 'group'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), r"asymmetric weights"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), r"kv_cache_scheme"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(type="int"), r"input_activations int 8-bit"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False), r"dynamic=False strategy 'token'"),
    (lambda q: q.update(quantization_status="frozen"), r"quantization_status 'frozen'"),
    (lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask"}), r"sparsity_config"),
])
def test_compressed_tensors_schemes(ct, change, named):
    edit_config(ct, lambda c: change(c["quantization_config"]))
    with pytest.raises(ConfigError, match="compressed-tensors scheme not supported: .*" + named) as err:
        load_model(ct)
    assert str(ct / "config.json") in str(err.value)


@pytest.mark.parametrize("block,named", [
    ({"qformat_weight": "int4"}, r"qformat_weight 'int4'"),
    ({"qformat_weight": "fp8_e4m3", "qscheme_act": "CHANNEL"}, r"qscheme_act 'CHANNEL'"),
])
def test_mistral_schemes(tmp_path, block, named):
    root = tmp_path / "m"
    w.write_mistral_fp8(random_pixtral(tp_args("mistral_kv2")), root)
    params = json.loads((root / "params.json").read_text())
    params["quantization"] = block
    (root / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=named) as err:
        load_model(root)
    assert str(root / "params.json") in str(err.value)


Q_PROJ = "language_model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("change,error,named", [
    (lambda c: c.pop("quantization_config"), CheckpointError, r"stored as fp8 .* declares no quantization"),
    # the config quantizes what is stored float, or leaves float what is stored fp8
    (lambda c: c["quantization_config"].update(ignore=["re:.*vision_tower.*"]), CheckpointError,
     r"quantizes 'language_model.lm_head', but its weight is stored as torch.float32"),
    (lambda c: c["quantization_config"]["ignore"].append("re:.*q_proj"), CheckpointError,
     rf"tensor '{Q_PROJ}.weight' is stored as fp8, but .* leaves '{Q_PROJ}' unquantized"),
])
def test_config_and_tensors_disagree(ct, change, error, named):
    edit_config(ct, change)
    with pytest.raises(error, match=named) as err:
        load_model(ct)
    assert str(ct) in str(err.value)


@pytest.mark.parametrize("change,named", [
    (lambda t: t.pop(f"{Q_PROJ}.weight_scale"), rf"fp8 weight '{Q_PROJ}.weight' has no scale '{Q_PROJ}.weight_scale'"),
    (lambda t: t.update({f"{Q_PROJ}.weight_scale": torch.ones(3, 1)}),
     rf"scale '{Q_PROJ}.weight_scale' has shape \[3, 1\]; .* channel scales needs \[64\] or \[64, 1\]"),
    (lambda t: t.update({f"{Q_PROJ}.weight_zero_point": torch.zeros(64, 1)}),
     rf"unexpected tensor '{Q_PROJ}.weight_zero_point'"),
    (lambda t: t.update({"language_model.model.embed_tokens.weight":
                         t["language_model.model.embed_tokens.weight"].to(w.E4M3)}),
     r"'language_model.model.embed_tokens.weight' is stored as fp8, but tok_embeddings.weight is not a linear"),
    (lambda t: t.update({f"{Q_PROJ}.weight": t[f"{Q_PROJ}.weight"].to(torch.float8_e5m2)}),
     rf"'{Q_PROJ}.weight' has dtype torch.float8_e5m2"),
])
def test_tensors(ct, change, named):
    edit_tensors(ct, change)
    with pytest.raises(CheckpointError, match=named) as err:
        load_model(ct)
    assert str(ct / "model.safetensors") in str(err.value)


def test_tensor_parallel_split_through_a_block(tmp_path):
    """q rows split at 32 of 64 over two ranks: tiles of 48 rows (whole heads of 16) would be cut."""
    w.write_transformers_fp8_blocks(random_pixtral(tp_args("hf_kv2")), tmp_path / "fp8", (48, 16))
    with pytest.raises(CheckpointError, match=r"layers.0.attention.wq.weight: this rank's rows \[0, 32\) of 64 "
                                             r"cut the fp8 scale blocks of 48 rows"):
        load_tp_model(tmp_path / "fp8", 0, 2)


def test_hf_q_k_blocks_cutting_heads(tmp_path):
    w.write_transformers_fp8_blocks(random_pixtral(tp_args("hf_kv2")), tmp_path / "fp8", (8, 16))
    with pytest.raises(CheckpointError, match=rf"'{Q_PROJ}.weight': block scales of 8 rows cut the heads of 16 rows"):
        load_model(tmp_path / "fp8")


def test_tensor_parallel_quantized_output_head(tmp_path):
    w.write_compressed_tensors(random_pixtral(tp_args("hf_kv2")), tmp_path / "ct", "channel")
    edit_config(tmp_path / "ct", lambda c: c["quantization_config"]["ignore"].remove("lm_head"))
    edit_tensors(tmp_path / "ct", lambda t: t.update(dict(zip(
        ("language_model.lm_head.weight", "language_model.lm_head.weight_scale"),
        w.channel_fp8(t["language_model.lm_head.weight"])))))
    assert type(load_model(tmp_path / "ct").output).__name__ == "Fp8Linear"  # whole: fine
    with pytest.raises(ValueError, match=r"cannot quantize 'output': it is a VocabParallelHead"):
        load_tp_model(tmp_path / "ct", 0, 2)
