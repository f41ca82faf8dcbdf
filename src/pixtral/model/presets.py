"""Configs of the released family members, and the tiny ones tests and the CLI's `init` use."""

from __future__ import annotations

from pixtral.errors import ConfigError
from pixtral.model.args import ModelArgs, VisionArgs


def _pixtral_12b() -> ModelArgs:
    return ModelArgs()


def _pixtral_large() -> ModelArgs:
    return ModelArgs(
        dim=12288, n_layers=88, head_dim=128, hidden_dim=28672, n_heads=96, n_kv_heads=8,
        vocab_size=32768, rope_theta=1e9,
        vision=VisionArgs(
            hidden_size=1408, num_hidden_layers=40, num_attention_heads=16, intermediate_size=6144,
            adapter_bias=False,
        ),
    )


def _mistral_small_31() -> ModelArgs:
    return ModelArgs(
        hidden_dim=32768,
        vision=VisionArgs(
            patch_size=14, image_size=1540, adapter_bias=False, spatial_merge_size=2,
            add_pre_mm_projector_layer_norm=True, mm_projector_id="patch_merge",
        ),
    )


def _tiny() -> ModelArgs:
    # Pixtral-12B layout at toy width; keeps the real vocabulary and image geometry so the
    # shipped tokenizer and preprocessing apply unchanged.
    return ModelArgs(
        dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=131072,
        rope_theta=1e9,
        vision=VisionArgs(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    )


def _tiny_small31() -> ModelArgs:
    return ModelArgs(
        dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=131072,
        vision=VisionArgs(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            patch_size=14, image_size=1540, adapter_bias=False, spatial_merge_size=2,
            add_pre_mm_projector_layer_norm=True, mm_projector_id="patch_merge",
        ),
    )


PRESETS = {
    "pixtral-12b-2409": _pixtral_12b,
    "pixtral-12b-base-2409": _pixtral_12b,  # same weights layout; the base model has no [INST] format
    "pixtral-large-2411": _pixtral_large,
    "mistral-small-3.1": _mistral_small_31,
    "tiny": _tiny,
    "tiny-small-3.1": _tiny_small31,
}


def preset(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    args = PRESETS[name]()
    args.validate(f"preset {name!r}")
    return args
