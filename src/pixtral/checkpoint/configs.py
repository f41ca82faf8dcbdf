"""Model configs as checkpoints store them: Mistral's `params.json` and Hugging Face's `config.json`
(LLaVA or Mistral3 flavour), read into `ModelArgs` with errors naming the file and key, and written
back so that transformers loads the same architecture. docs/architecture.md lists both layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pixtral.errors import ConfigError
from pixtral.model.args import ModelArgs, VisionArgs


def args_from_params_json(params: dict[str, Any], source: str = "params.json") -> ModelArgs:
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    required = ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "norm_eps")
    missing = [k for k in required if k not in params]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {', '.join(repr(k) for k in missing)}")
    unsupported = {"moe": "mixture-of-experts layers", "lora": "LoRA adapters in params.json"}
    for key, what in unsupported.items():
        if params.get(key):
            raise ConfigError(f"{source}: key {key!r} ({what}) is not supported by this implementation")
    if params.get("sliding_window") not in (None, 0):
        raise ConfigError(f"{source}: 'sliding_window' = {params['sliding_window']!r} is not supported")
    vision = None
    venc = params.get("vision_encoder")
    if venc is not None:
        if not isinstance(venc, dict):
            raise ConfigError(f"{source}: 'vision_encoder' must be an object")
        known = {f.name for f in dataclasses.fields(VisionArgs)}
        # The tokenizer's business, not the model's: [IMG_BREAK]/[IMG_END] are ordinary embeddings.
        ignored = {"max_image_size", "image_break_token_id", "image_end_token_id"}
        unknown = set(venc) - known - ignored
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) in 'vision_encoder': {sorted(unknown)}")
        vision = VisionArgs(**{k: v for k, v in venc.items() if k in known})
    n_heads = params["n_heads"]
    args = ModelArgs(
        dim=params["dim"],
        n_layers=params["n_layers"],
        head_dim=params.get("head_dim", params["dim"] // n_heads),
        hidden_dim=params["hidden_dim"],
        n_heads=n_heads,
        n_kv_heads=params["n_kv_heads"],
        norm_eps=params["norm_eps"],
        vocab_size=params["vocab_size"],
        rope_theta=params.get("rope_theta", 10000.0),
        max_seq_len=params.get("max_seq_len", params.get("max_position_embeddings", 131072)),
        vision=vision,
    )
    args.validate(source)
    return args


def params_json(args: ModelArgs) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim,
        "hidden_dim": args.hidden_dim, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "norm_eps": args.norm_eps, "vocab_size": args.vocab_size, "rope_theta": args.rope_theta,
        "max_seq_len": args.max_seq_len,
    }
    if args.vision is not None:
        v = dataclasses.asdict(args.vision)
        v.pop("norm_eps")
        out["vision_encoder"] = v
    return out


def args_from_hf_config(config: dict[str, Any], source: str = "config.json") -> ModelArgs:
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    model_type = config.get("model_type")
    if model_type not in ("llava", "mistral3", "mistral"):
        raise ConfigError(
            f"{source}: 'model_type' {model_type!r} is not a Pixtral layout (expected 'llava' or 'mistral3')"
        )
    text = config if model_type == "mistral" else config.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: missing 'text_config'")
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"):
        if key not in text:
            raise ConfigError(f"{source}: missing 'text_config.{key}'")
    if text.get("sliding_window") not in (None, 0):
        raise ConfigError(f"{source}: 'text_config.sliding_window' = {text['sliding_window']!r} is not supported")
    if text.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: 'text_config.hidden_act' must be 'silu', got {text['hidden_act']!r}")
    if text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)):
        raise ConfigError(f"{source}: tied input/output embeddings are not a Pixtral layout")
    n_heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // n_heads
    vision = None
    if model_type != "mistral":
        vision = _vision_from_hf(config, source)
    args = ModelArgs(
        dim=text["hidden_size"],
        n_layers=text["num_hidden_layers"],
        head_dim=head_dim,
        hidden_dim=text["intermediate_size"],
        n_heads=n_heads,
        n_kv_heads=text.get("num_key_value_heads", n_heads),
        norm_eps=text.get("rms_norm_eps", 1e-5),
        vocab_size=text["vocab_size"],
        rope_theta=_rope_theta(text, 1e9),
        max_seq_len=text.get("max_position_embeddings", 131072),
        vision=vision,
    )
    args.validate(source)
    return args


def hf_config(args: ModelArgs) -> dict[str, Any]:
    """A config.json that transformers loads into the same architecture."""
    text = {
        "model_type": "mistral",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len, "hidden_act": "silu",
        "sliding_window": None, "tie_word_embeddings": False,
    }
    v = args.vision
    if v is None:
        return {**text, "architectures": ["MistralForCausalLM"]}
    if v.uses_patch_merger and not v.add_pre_mm_projector_layer_norm:
        # Mistral3's projector (the only HF class with a patch merger) always applies this norm.
        raise ConfigError("this model has a patch merger but no pre-projector norm "
                          "(add_pre_mm_projector_layer_norm: false); transformers' Mistral3 always applies "
                          "that norm, so the Hugging Face layout cannot hold it: keep the Mistral layout")
    vision = {
        "model_type": "pixtral", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
        "rope_theta": v.rope_theta, "head_dim": v.head_dim, "hidden_act": "silu",
    }
    common = {
        "text_config": text, "vision_config": vision, "image_token_index": v.image_token_id,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": v.adapter_bias,
        "vision_feature_layer": -1, "tie_word_embeddings": False,
    }
    if v.uses_patch_merger or v.add_pre_mm_projector_layer_norm:
        return {
            **common, "model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"],
            "spatial_merge_size": v.spatial_merge_size,
        }
    return {
        **common, "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "vision_feature_select_strategy": "full", "image_seq_length": 1,
    }


def _rope_theta(section: dict[str, Any], default: float) -> float:
    # transformers >= 5 stores RoPE settings under "rope_parameters"; older versions use "rope_theta".
    params = section.get("rope_parameters") or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"RoPE scaling {params.get('rope_type')!r} is not supported")
    if section.get("rope_scaling"):
        raise ConfigError(f"'rope_scaling' {section['rope_scaling']!r} is not supported")
    return float(params.get("rope_theta", section.get("rope_theta", default)))


def _vision_from_hf(config: dict[str, Any], source: str) -> VisionArgs:
    vc = config.get("vision_config")
    if not isinstance(vc, dict):
        raise ConfigError(f"{source}: missing 'vision_config'")
    if vc.get("model_type", "pixtral") != "pixtral":
        raise ConfigError(f"{source}: 'vision_config.model_type' must be 'pixtral', got {vc.get('model_type')!r}")
    act = vc.get("hidden_act", "silu")
    if act not in ("silu", "gelu"):
        raise ConfigError(f"{source}: 'vision_config.hidden_act' {act!r} is not supported")
    # Note: Pixtral's vision FFN is SiLU-gated in every released checkpoint. Some early HF
    # configs carry transformers' default "gelu"; the weights were trained with SiLU, so we
    # run SiLU (the reference behaviour) whatever the file says.
    if config.get("vision_feature_layer", -1) not in (-1, [-1]):
        raise ConfigError(
            f"{source}: 'vision_feature_layer' = {config['vision_feature_layer']!r}; Pixtral uses the last layer (-1)"
        )
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{source}: 'projector_hidden_act' must be 'gelu', got {config['projector_hidden_act']!r}")
    merge = int(config.get("spatial_merge_size", 1))
    is_mistral3 = config.get("model_type") == "mistral3"
    return VisionArgs(
        hidden_size=vc.get("hidden_size", 1024),
        num_channels=vc.get("num_channels", 3),
        image_size=vc.get("image_size", 1024),
        patch_size=vc.get("patch_size", 16),
        rope_theta=_rope_theta(vc, 10000.0),
        intermediate_size=vc.get("intermediate_size", 4096),
        num_hidden_layers=vc.get("num_hidden_layers", 24),
        num_attention_heads=vc.get("num_attention_heads", 16),
        image_token_id=config.get("image_token_index", config.get("image_token_id", 10)),
        adapter_bias=bool(config.get("multimodal_projector_bias", not is_mistral3)),
        spatial_merge_size=merge,
        add_pre_mm_projector_layer_norm=is_mistral3,
        mm_projector_id="patch_merge" if merge > 1 else "",
    )
