"""Writing fp8 checkpoints in the compressed-tensors layout (what `pixtral convert --quantization fp8` writes).

The layout is llm-compressor's `FP8_DYNAMIC` scheme, which vLLM and transformers (through the
`compressed-tensors` package) read: in the Hugging Face layout, each decoder linear (q/k/v/o,
gate/up/down) holds `weight` in float8_e4m3fn and `weight_scale` [out_features, 1] beside it
(`weight ~= weight * weight_scale`, one scale per output channel, symmetric, round to nearest);
activations are quantized dynamically per token by the engine that runs it, so none are stored.
`config.json` gets a `quantization_config` (`quant_method: "compressed-tensors"`, `format:
"float-quantized"`, one config group targeting `Linear`) whose `ignore` list keeps the output
head, the vision encoder, the adapter / patch merger (and the embeddings, which are not linear
anyway) in float. Field names and shapes follow compressed-tensors 0.20's `QuantizationConfig`
and `initialize_qparams`.

Scales are written in float32 (compressed-tensors makes them in the model's dtype; every reader
casts them to what it computes in): the exact scales we quantized with, so loading the file
gives the weights `quantize_linears` gives.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from pixtral.quant.apply import DECODER_LINEARS
from pixtral.quant.linear import FP8_DTYPE, quantize_fp8

_DECODER_WEIGHT = re.compile(rf"layers\.\d+\.(attention|feed_forward)\.({'|'.join(DECODER_LINEARS)})\.weight")

# The modules left float, as compressed-tensors matches them (`re:` a regex from the start of the
# module name); written for every prefix generation of the HF names (vLLM's and transformers').
IGNORE = ["re:.*lm_head", "re:.*embed_tokens", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


def compressed_tensors_config() -> dict:
    """config.json's `quantization_config` for fp8 weights per channel, dynamic per-token fp8 activations."""
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {**fp8, "strategy": "channel", "dynamic": False},
            "input_activations": {**fp8, "strategy": "token", "dynamic": True},
            "output_activations": None,
            "format": None,
        }},
        "ignore": list(IGNORE),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


class CompressedTensorsWriter:
    """`produce(name)` for `write_checkpoint`: decoder linear weights quantized as they are read.

    `shapes` (name -> (shape, dtype), Mistral names) becomes the quantized checkpoint's: the
    decoder weights in fp8, each with its `<module>.weight_scale` [out, 1] float32. A weight is
    quantized when it is asked for; its scale, asked for right after, comes from that one pass.
    """

    def __init__(self, read: Callable[[str], torch.Tensor], shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.read = read
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._scales: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in shapes.items():
            if _DECODER_WEIGHT.fullmatch(name):
                self.shapes[name] = (tuple(shape), FP8_DTYPE)
                self.shapes[name.removesuffix("weight") + "weight_scale"] = ((shape[0], 1), torch.float32)
            else:
                self.shapes[name] = (tuple(shape), dtype)

    def __call__(self, name: str) -> torch.Tensor:
        if name in self._scales:
            return self._scales.pop(name)
        tensor = self.read(name)
        if not _DECODER_WEIGHT.fullmatch(name):
            return tensor
        q, scale = quantize_fp8(tensor, per_channel=True)
        self._scales[name.removesuffix("weight") + "weight_scale"] = scale.reshape(-1, 1)
        return q
