"""Parameter names in the two official layouts and the q/k permutation between them.

Mistral-native names are our module names. The Hugging Face layout (LLaVA for Pixtral-12B,
Mistral3 for Mistral-Small-3.1) renames them and stores wq/wk rows in `rotate_half` order:
within each head, the real parts (even rows) first, then the imaginary parts (odd rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixtral.model.args import ModelArgs

# transformers >= 4.52 saves these prefixes; older checkpoints (mistral-community/pixtral-12b,
# the Mistral-Small-3.1 release) use the legacy ones on the right. We read both, write legacy.
HF_CURRENT_TO_LEGACY = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


@dataclass(frozen=True)
class KeySpec:
    mistral: str
    hf: str
    permute_heads: int = 0  # > 0: q/k weight with this many heads (HF rows are rotate_half order)
    head_dim: int = 0


def _block_specs(m: str, h: str, *, attn: str, norms: tuple[str, str], ffn: str,
                 q_heads: int, kv_heads: int, head_dim: int) -> list[KeySpec]:
    """One transformer block: Mistral names under prefix m, HF names under prefix h."""
    return [
        KeySpec(m + "attention.wq.weight", f"{h}{attn}.q_proj.weight", q_heads, head_dim),
        KeySpec(m + "attention.wk.weight", f"{h}{attn}.k_proj.weight", kv_heads, head_dim),
        KeySpec(m + "attention.wv.weight", f"{h}{attn}.v_proj.weight"),
        KeySpec(m + "attention.wo.weight", f"{h}{attn}.o_proj.weight"),
        KeySpec(m + "attention_norm.weight", f"{h}{norms[0]}.weight"),
        KeySpec(m + "ffn_norm.weight", f"{h}{norms[1]}.weight"),
        KeySpec(m + "feed_forward.w1.weight", f"{h}{ffn}.gate_proj.weight"),
        KeySpec(m + "feed_forward.w2.weight", f"{h}{ffn}.down_proj.weight"),
        KeySpec(m + "feed_forward.w3.weight", f"{h}{ffn}.up_proj.weight"),
    ]


def key_specs(args: ModelArgs) -> list[KeySpec]:
    """Every parameter of the model, in both layouts."""
    specs = [
        KeySpec("tok_embeddings.weight", "language_model.model.embed_tokens.weight"),
        KeySpec("norm.weight", "language_model.model.norm.weight"),
        KeySpec("output.weight", "language_model.lm_head.weight"),
    ]
    for i in range(args.n_layers):
        specs += _block_specs(
            f"layers.{i}.", f"language_model.model.layers.{i}.", attn="self_attn",
            norms=("input_layernorm", "post_attention_layernorm"), ffn="mlp",
            q_heads=args.n_heads, kv_heads=args.n_kv_heads, head_dim=args.head_dim,
        )
    v = args.vision
    if v is None:
        return specs
    specs += [
        KeySpec("vision_encoder.patch_conv.weight", "vision_tower.patch_conv.weight"),
        KeySpec("vision_encoder.ln_pre.weight", "vision_tower.ln_pre.weight"),
    ]
    for i in range(v.num_hidden_layers):
        # The HF vision tower keeps Mistral's module names; only the projection leaves change.
        specs += _block_specs(
            f"vision_encoder.transformer.layers.{i}.", f"vision_tower.transformer.layers.{i}.", attn="attention",
            norms=("attention_norm", "ffn_norm"), ffn="feed_forward",
            q_heads=v.num_attention_heads, kv_heads=v.num_attention_heads, head_dim=v.head_dim,
        )
    if v.add_pre_mm_projector_layer_norm:
        specs.append(KeySpec("pre_mm_projector_norm.weight", "multi_modal_projector.norm.weight"))
    if v.uses_patch_merger:
        specs.append(KeySpec("patch_merger.merging_layer.weight",
                             "multi_modal_projector.patch_merger.merging_layer.weight"))
    for ours, theirs in (("w_in", "linear_1"), ("w_out", "linear_2")):
        names = ("weight", "bias") if v.adapter_bias else ("weight",)
        for leaf in names:
            specs.append(KeySpec(f"vision_language_adapter.{ours}.{leaf}", f"multi_modal_projector.{theirs}.{leaf}"))
    return specs


def hf_legacy_name(key: str) -> str:
    for current, legacy in HF_CURRENT_TO_LEGACY:
        if key.startswith(current):
            return legacy + key[len(current):]
    return key


def to_hf_rows(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Mistral (interleaved pairs) -> HF (rotate_half) row order of a q/k weight."""
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def from_hf_rows(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF (rotate_half) -> Mistral (interleaved pairs) row order of a q/k weight."""
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(weight.shape)
