"""Model configuration: dataclasses named after the fields of Mistral's `params.json`.

`ModelArgs.from_params_json` reads the Mistral-native layout and `from_hf_config` reads the
Hugging Face `config.json` (LLaVA or Mistral3 flavour). Presets cover the released family
members and the tiny configs used by tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pixtral.errors import ConfigError


@dataclass
class VisionArgs:
    """PixtralViT plus the vision->language path (pre-norm, patch merger, adapter)."""

    hidden_size: int = 1024
    num_channels: int = 3
    image_size: int = 1024  # only sizes the RoPE table: max patches per side = image_size // patch_size
    patch_size: int = 16
    rope_theta: float = 10000.0
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_token_id: int = 10
    adapter_bias: bool = True
    spatial_merge_size: int = 1
    add_pre_mm_projector_layer_norm: bool = False
    mm_projector_id: str = ""
    norm_eps: float = 1e-5  # hard-coded in the reference, not stored in params.json

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def uses_patch_merger(self) -> bool:
        return self.mm_projector_id == "patch_merge"


@dataclass
class ModelArgs:
    """The Mistral decoder; `vision` is None for a text-only model."""

    dim: int = 5120
    n_layers: int = 40
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    norm_eps: float = 1e-5
    vocab_size: int = 131072
    rope_theta: float = 1e9
    max_seq_len: int = 131072
    vision: VisionArgs | None = field(default_factory=VisionArgs)

    # ------------------------------------------------------------------ checks
    def validate(self, source: str = "config") -> None:
        ints = {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size, "max_seq_len": self.max_seq_len,
        }
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: '{name}' must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{source}: 'n_heads' ({self.n_heads}) must be a multiple of 'n_kv_heads' ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: 'head_dim' must be even for RoPE, got {self.head_dim}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{source}: '{name}' must be a positive number, got {value!r}")
        v = self.vision
        if v is None:
            return
        vints = {
            "hidden_size": v.hidden_size, "num_channels": v.num_channels, "image_size": v.image_size,
            "patch_size": v.patch_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "spatial_merge_size": v.spatial_merge_size,
        }
        for name, value in vints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: 'vision_encoder.{name}' must be a positive integer, got {value!r}")
        if v.hidden_size % v.num_attention_heads or v.head_dim % 4:
            raise ConfigError(
                f"{source}: vision head_dim = hidden_size/num_attention_heads must be an integer "
                f"divisible by 4 for RoPE-2D, got {v.hidden_size}/{v.num_attention_heads}"
            )
        if v.mm_projector_id not in ("", "patch_merge"):
            raise ConfigError(
                f"{source}: unknown 'vision_encoder.mm_projector_id' {v.mm_projector_id!r} "
                "(supported: '' and 'patch_merge')"
            )
        if v.uses_patch_merger != (v.spatial_merge_size > 1):
            raise ConfigError(
                f"{source}: 'vision_encoder.spatial_merge_size' = {v.spatial_merge_size} does not match "
                f"'mm_projector_id' = {v.mm_projector_id!r} (a merge size > 1 needs 'patch_merge')"
            )
        if not 0 <= v.image_token_id < self.vocab_size:
            raise ConfigError(
                f"{source}: 'vision_encoder.image_token_id' {v.image_token_id} is outside the vocabulary "
                f"(vocab_size {self.vocab_size})"
            )

    # ------------------------------------------------------------------ params.json
    @classmethod
    def from_params_json(cls, params: dict[str, Any], source: str = "params.json") -> "ModelArgs":
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
        args = cls(
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

    def to_params_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if self.vision is not None:
            v = dataclasses.asdict(self.vision)
            v.pop("norm_eps")
            out["vision_encoder"] = v
        return out

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> "ModelArgs":
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
        args = cls(
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

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json that transformers loads into the same architecture."""
        text = {
            "model_type": "mistral",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "rms_norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len, "hidden_act": "silu",
            "sliding_window": None, "tie_word_embeddings": False,
        }
        v = self.vision
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


# ---------------------------------------------------------------------- presets
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
