"""Independent writers of fp8 checkpoints in the three formats the loader reads, for the tests.

Written from the formats' public descriptions with plain `safetensors` and `json` -- not with
`pixtral.checkpoint.save` nor `pixtral.quant` -- so a loader bug is not mirrored by its writer:
the HF tensor names, the q/k row order of the HF layout (rotate_half within each head) and the
quantization (scales, e4m3 rounding, tiles) are all spelled out here. Only the architecture part
of config.json / params.json comes from `pixtral.checkpoint.configs`.

Each writer returns the float state dict (Mistral names) of the weights the checkpoint stands for
(the fp8 weights times their scales), to build the reference float model from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from pixtral.checkpoint.configs import hf_config, params_json
from pixtral.model import Pixtral

E4M3 = torch.float8_e4m3fn
DECODER = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")


def hf_name(ours: str) -> str:
    """Our (Mistral) parameter name -> the legacy HF (LLaVA / Mistral3) one."""
    rules = [
        (r"^tok_embeddings\.", "language_model.model.embed_tokens."),
        (r"^norm\.", "language_model.model.norm."),
        (r"^output\.", "language_model.lm_head."),
        (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"language_model.model.layers.\1.self_attn.\2_proj."),
        (r"^layers\.(\d+)\.attention_norm\.", r"language_model.model.layers.\1.input_layernorm."),
        (r"^layers\.(\d+)\.ffn_norm\.", r"language_model.model.layers.\1.post_attention_layernorm."),
        (r"^layers\.(\d+)\.feed_forward\.w1\.", r"language_model.model.layers.\1.mlp.gate_proj."),
        (r"^layers\.(\d+)\.feed_forward\.w2\.", r"language_model.model.layers.\1.mlp.down_proj."),
        (r"^layers\.(\d+)\.feed_forward\.w3\.", r"language_model.model.layers.\1.mlp.up_proj."),
        (r"^vision_encoder\.transformer\.layers\.(\d+)\.attention\.w([qkvo])\.",
         r"vision_tower.transformer.layers.\1.attention.\2_proj."),
        (r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w1\.",
         r"vision_tower.transformer.layers.\1.feed_forward.gate_proj."),
        (r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w2\.",
         r"vision_tower.transformer.layers.\1.feed_forward.down_proj."),
        (r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w3\.",
         r"vision_tower.transformer.layers.\1.feed_forward.up_proj."),
        (r"^vision_encoder\.", "vision_tower."),
        (r"^vision_language_adapter\.w_in\.", "multi_modal_projector.linear_1."),
        (r"^vision_language_adapter\.w_out\.", "multi_modal_projector.linear_2."),
        (r"^pre_mm_projector_norm\.", "multi_modal_projector.norm."),
        (r"^patch_merger\.", "multi_modal_projector.patch_merger."),
    ]
    for pattern, repl in rules:
        if re.match(pattern, ours):
            return re.sub(pattern, repl, ours)
    raise KeyError(ours)


def rotate_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral (interleaved pairs) -> HF (rotate_half) rows: in each head, even rows first, then odd."""
    heads = w.reshape(n_heads, -1, *w.shape[1:])
    return torch.cat([heads[:, 0::2], heads[:, 1::2]], dim=1).reshape(w.shape)


def _heads(model: Pixtral, ours: str) -> int:
    """Heads of a q/k weight (its HF rows are permuted), else 0."""
    a = model.args
    if re.fullmatch(r"layers\.\d+\.attention\.wq\.weight", ours):
        return a.n_heads
    if re.fullmatch(r"layers\.\d+\.attention\.wk\.weight", ours):
        return a.n_kv_heads
    if re.fullmatch(r"vision_encoder\.transformer\.layers\.\d+\.attention\.w[qk]\.weight", ours):
        return a.vision.num_attention_heads
    return 0


def e4m3(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w.float() / scale).clamp(-448.0, 448.0).to(E4M3)


def channel_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
    return e4m3(w, scale), scale  # scale [out, 1]


def tensor_fp8(w: torch.Tensor, scale_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.float().abs().amax() / 448.0).to(scale_dtype).float()
    return e4m3(w, scale), scale


def block_fp8(w: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiles of rows x cols (the last ones partial): (fp8 weight, scales [ceil(out/rows), ceil(in/cols)], the
    scales expanded to the weight's shape)."""
    out_f, in_f = w.shape
    nr, nc = -(-out_f // rows), -(-in_f // cols)
    scales = torch.empty(nr, nc)
    full = torch.empty(out_f, in_f)
    for i in range(nr):
        for j in range(nc):
            tile = (slice(i * rows, (i + 1) * rows), slice(j * cols, (j + 1) * cols))
            scales[i, j] = w[tile].float().abs().amax() / 448.0
            full[tile] = scales[i, j]
    return e4m3(w, full), scales, full


def _save(root: Path, tensors: dict, config_name: str, config: dict, weights_name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / weights_name), metadata={"format": "pt"})
    (root / config_name).write_text(json.dumps(config, indent=2))
    return root


def write_compressed_tensors(model: Pixtral, root: Path, strategy: str, static_input: bool = False,
                             quantize_vision: bool = False) -> dict[str, torch.Tensor]:
    """llm-compressor's layout: HF names, fp8 decoder linears (and with `quantize_vision` the vision
    encoder's) with `weight_scale` [out, 1] (channel) or [1] (tensor, in bfloat16 as its writer keeps the
    model's dtype), `input_scale` [1] when `static_input`; config.json's compressed-tensors config."""
    tensors, reference = {}, {}
    quantized = DECODER if not quantize_vision else re.compile(
        DECODER.pattern + r"|vision_encoder\.transformer\.layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")
    for ours, p in model.state_dict().items():
        name, heads = hf_name(ours), _heads(model, ours)
        if not quantized.fullmatch(ours):
            tensors[name] = rotate_half_rows(p, heads) if heads else p
            reference[ours] = p
            continue
        if strategy == "channel":
            q, scale = channel_fp8(p)
            stored_scale = scale
        else:
            q, scale = tensor_fp8(p, torch.bfloat16)
            stored_scale = scale.reshape(1).to(torch.bfloat16)
        reference[ours] = q.float() * scale
        tensors[name] = rotate_half_rows(q, heads) if heads else q
        scale_name = name.removesuffix("weight") + "weight_scale"
        tensors[scale_name] = rotate_half_rows(stored_scale, heads) if heads and strategy == "channel" else stored_scale
        if static_input:
            tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor([0.05])
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    act = ({**fp8, "strategy": "tensor", "dynamic": False} if static_input
           else {**fp8, "strategy": "token", "dynamic": True})
    # transformers 5's module names: "lm_head" (an exact name), "model.vision_tower...", "model.multi_modal_projector..."
    ignore = ["lm_head", "re:.*multi_modal_projector.*"] + ([] if quantize_vision else ["re:.*vision_tower.*"])
    config = {**hf_config(model.args), "quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**fp8, "strategy": strategy, "dynamic": False},
                                      "input_activations": act}},
        "ignore": ignore, "kv_cache_scheme": None}}
    _save(root, tensors, "config.json", config, "model.safetensors")
    return reference


def write_transformers_fp8_blocks(model: Pixtral, root: Path, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """transformers' fine-grained fp8: HF names, decoder linears fp8 with `weight_scale_inv` per tile (a
    multiplier), the rest float (`modules_to_not_convert`)."""
    tensors, reference = {}, {}
    for ours, p in model.state_dict().items():
        name, heads = hf_name(ours), _heads(model, ours)
        if DECODER.fullmatch(ours):
            q, scales, full = block_fp8(p, *block)
            reference[ours] = q.float() * full
            tensors[name] = rotate_half_rows(q, heads) if heads else q
            tensors[name.removesuffix("weight") + "weight_scale_inv"] = scales
        else:
            reference[ours] = p
            tensors[name] = rotate_half_rows(p, heads) if heads else p
    config = {**hf_config(model.args), "quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block),
        "modules_to_not_convert": ["lm_head", "vision_tower", "multi_modal_projector"]}}
    _save(root, tensors, "config.json", config, "model.safetensors")
    return reference


def write_mistral_fp8(model: Pixtral, root: Path, per_channel: bool = False,
                      static_act: bool = True) -> dict[str, torch.Tensor]:
    """Mistral's own: Mistral names, decoder linears fp8 with `qscale_weight` (a scalar, or one per
    output row) and `qscale_act` (static, qscheme_act TENSOR) beside each; params.json's quantization block."""
    tensors, reference = {}, {}
    for ours, p in model.state_dict().items():
        if not DECODER.fullmatch(ours):
            tensors[ours] = reference[ours] = p
            continue
        if per_channel:
            q, scale = channel_fp8(p)
            stored_scale = scale.reshape(-1)
        else:
            q, scale = tensor_fp8(p)
            stored_scale = scale.reshape(())
        reference[ours] = q.float() * scale
        module = ours.removesuffix("weight")
        tensors[ours], tensors[module + "qscale_weight"] = q, stored_scale
        if static_act:
            tensors[module + "qscale_act"] = torch.tensor(0.05)
    params = {**params_json(model.args),
              "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR" if static_act else "NO_SCALES"}}
    _save(root, tensors, "params.json", params, "consolidated.safetensors")
    return reference


def float_model(args, state: dict[str, torch.Tensor]) -> Pixtral:
    model = Pixtral(args)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)
