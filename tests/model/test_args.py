"""Configs from params.json / config.json, presets, and clear errors for bad values."""

import pytest

from pixtral.errors import ConfigError
from pixtral.checkpoint.configs import args_from_hf_config, args_from_params_json, hf_config, params_json
from pixtral.model import preset


def test_pixtral_12b_preset_matches_spec():
    a = preset("pixtral-12b-2409")
    assert (a.dim, a.n_layers, a.head_dim, a.hidden_dim, a.n_heads, a.n_kv_heads) == (5120, 40, 128, 14336, 32, 8)
    assert (a.vocab_size, a.rope_theta, a.norm_eps) == (131072, 1e9, 1e-5)
    v = a.vision
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.head_dim) == (1024, 24, 16, 64)
    assert (v.intermediate_size, v.patch_size, v.image_size, v.rope_theta) == (4096, 16, 1024, 1e4)
    assert v.adapter_bias and v.spatial_merge_size == 1 and v.image_token_id == 10


def test_other_presets():
    large = preset("pixtral-large-2411")
    assert large.vocab_size == 32768 and large.vision.hidden_size == 1408 and large.vision.head_dim == 88
    assert not large.vision.adapter_bias
    small = preset("mistral-small-3.1")
    assert small.hidden_dim == 32768 and small.vision.patch_size == 14 and small.vision.uses_patch_merger
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset("nope")


@pytest.mark.parametrize("name", ["pixtral-12b-2409", "mistral-small-3.1", "pixtral-large-2411", "tiny"])
def test_round_trips(name):
    a = preset(name)
    assert args_from_params_json(params_json(a)) == a
    assert args_from_hf_config(hf_config(a)) == a


def test_bad_values_name_the_key():
    params = params_json(preset("tiny"))
    with pytest.raises(ConfigError, match="params.json: missing required key\\(s\\) 'dim'"):
        args_from_params_json({k: v for k, v in params.items() if k != "dim"})
    with pytest.raises(ConfigError, match="'n_layers' must be a positive integer"):
        args_from_params_json({**params, "n_layers": -1})
    with pytest.raises(ConfigError, match="unknown 'vision_encoder.mm_projector_id' 'mlp'"):
        args_from_params_json({**params, "vision_encoder": {**params["vision_encoder"], "mm_projector_id": "mlp"}})
    with pytest.raises(ConfigError, match="unknown key\\(s\\) in 'vision_encoder': \\['colour'\\]"):
        args_from_params_json({**params, "vision_encoder": {**params["vision_encoder"], "colour": 1}})
    with pytest.raises(ConfigError, match="multiple of 'n_kv_heads'"):
        args_from_params_json({**params, "n_kv_heads": 3})
    hf = hf_config(preset("tiny"))
    with pytest.raises(ConfigError, match="'vision_feature_layer' = -2"):
        args_from_hf_config({**hf, "vision_feature_layer": -2})
    with pytest.raises(ConfigError, match="'model_type' 'bert'"):
        args_from_hf_config({**hf, "model_type": "bert"})
