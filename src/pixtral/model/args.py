"""Model configuration: dataclasses named after the fields of Mistral's `params.json`.

Reading and writing them as `params.json` or Hugging Face `config.json` is the checkpoint code's
job (`pixtral.checkpoint.configs`); the released family members are in `pixtral.model.presets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
