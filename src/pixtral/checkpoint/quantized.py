"""Which of a checkpoint's linears are stored quantized, and where their scales are, from headers alone.

`index_quantized` checks, before any weight is read, that the stored dtypes agree with what the
config declares (`pixtral.quant.formats`): a linear the config quantizes must hold an fp8 weight
and its scale (of the shape its strategy gives), one the config leaves float must hold a float
weight, and no other tensor may be fp8. Anything else is refused naming the tensor and the file:
a checkpoint is loaded as its writer meant or not at all.

Scales get our names beside the weight (`layers.0.attention.wq.weight_scale`, `...input_scale`),
whatever the checkpoint calls them (`weight_scale`, `weight_scale_inv`, `qscale_weight`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixtral.checkpoint.layout import HF_CURRENT_TO_LEGACY, hf_legacy_name
from pixtral.checkpoint.safetensors_io import TensorInfo
from pixtral.errors import CheckpointError
from pixtral.quant.formats import LinearQuant, StoredQuantization
from pixtral.quant.linear import FP8_DTYPE

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class StoredLinear:
    """One linear whose weight the checkpoint stores in fp8: what one scale covers, and its extras."""

    strategy: str  # "channel" (one scale per output row), "tensor" or "block"
    block: tuple[int, int] | None = None  # (rows, columns) of a tile with one scale
    input_scale: bool = False  # a static activation scale is stored too


def index_quantized(quantization: StoredQuantization | None, tensors: dict[str, tuple[str, TensorInfo]],
                    stored: dict[str, TensorInfo], linears: set[str], hf: bool, q_k_head_dims: dict[str, int],
                    config_name: str) -> tuple[dict[str, StoredLinear], dict[str, tuple[str, TensorInfo]]]:
    """(the fp8 linears by our module name, their scale tensors by our parameter name -> (stored name, info)).

    `tensors`: our parameter name -> (stored name, info), as `index_tensors` matched them; `stored`:
    every stored tensor by its stored name; `linears`: our model's linear module names;
    `q_k_head_dims`: HF-layout q/k weights (stored permuted) -> head_dim.
    """
    for ours, (name, info) in tensors.items():
        if info.dtype not in FLOAT_DTYPES and info.dtype != FP8_DTYPE:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}; weights load from float "
                                  f"tensors, or fp8 e4m3 ones with a quantization declared in {config_name}")
        if info.dtype == FP8_DTYPE and quantization is None:
            raise CheckpointError(f"{info.file}: tensor {name!r} is stored as fp8 (float8_e4m3fn) but {config_name} "
                                  "declares no quantization ('quantization_config' / 'quantization')")
    if quantization is None:
        return {}, {}
    out: dict[str, StoredLinear] = {}
    scales: dict[str, tuple[str, TensorInfo]] = {}
    for ours, (name, info) in tensors.items():
        module, _, leaf = ours.rpartition(".")
        fp8 = info.dtype == FP8_DTYPE
        if leaf != "weight" or module not in linears:
            if fp8:
                raise CheckpointError(f"{info.file}: tensor {name!r} is stored as fp8, but {ours} is not a linear "
                                      "layer's weight: quantized embeddings, norms and convolutions are not supported")
            continue
        stored_module = name[: -len(".weight")]
        if quantization.lists_modules:
            how = quantization.for_module(_candidates(stored_module, module, hf))
            if how is not None and not fp8:
                raise CheckpointError(f"{info.file}: {quantization.source} ({quantization.method}) quantizes "
                                      f"{stored_module!r}, but its weight is stored as {info.dtype}, not fp8")
            if how is None and fp8:
                raise CheckpointError(f"{info.file}: tensor {name!r} is stored as fp8, but {quantization.source} "
                                      f"({quantization.method}) leaves {stored_module!r} unquantized (ignore / targets)")
        else:  # Mistral's format lists no modules: the fp8 weights are the quantized ones
            how = quantization.groups[0][1] if fp8 else None
        if how is None:
            continue
        linear = _stored_linear(how, stored_module, info, stored, quantization)
        if linear.block is not None and ours in q_k_head_dims and linear.block[0] % q_k_head_dims[ours]:
            # the HF rows of q/k are permuted within each head: a tile holding part of a head
            # would hold rows of other tiles once permuted back
            raise CheckpointError(f"{info.file}: {name!r}: block scales of {linear.block[0]} rows cut the "
                                  f"heads of {q_k_head_dims[ours]} rows, which the HF layout stores permuted")
        scales[module + ".weight_scale"] = (f"{stored_module}.{how.scale}", stored[f"{stored_module}.{how.scale}"])
        if linear.input_scale:
            scales[module + ".input_scale"] = (f"{stored_module}.{how.input_scale}",
                                               stored[f"{stored_module}.{how.input_scale}"])
        out[module] = linear
    return out, scales


def _candidates(stored_module: str, ours: str, hf: bool) -> tuple[str, ...]:
    """The names a config may call a module by: as stored, both HF prefix generations, and ours."""
    if not hf:
        return stored_module, ours
    legacy = hf_legacy_name(stored_module + ".")  # the prefixes end with a dot
    current = next((cur + legacy[len(old):] for cur, old in HF_CURRENT_TO_LEGACY if legacy.startswith(old)), legacy)
    return stored_module, legacy[:-1], current[:-1], ours


def _stored_linear(how: LinearQuant, module: str, weight: TensorInfo, stored: dict[str, TensorInfo],
                   quantization: StoredQuantization) -> StoredLinear:
    scale_name = f"{module}.{how.scale}"
    scale = stored.get(scale_name)
    if scale is None:
        raise CheckpointError(f"{weight.file}: fp8 weight {module + '.weight'!r} has no scale {scale_name!r} "
                              f"({quantization.method} stores one beside each quantized weight)")
    if scale.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{scale.file}: scale {scale_name!r} has dtype {scale.dtype}, not a float")
    out_f, in_f = weight.shape
    shapes = {"channel": [(out_f,), (out_f, 1)], "tensor": [(), (1,)]}
    if how.block is not None:
        shapes["block"] = [(-(-out_f // how.block[0]), -(-in_f // how.block[1]))]
    strategies = [how.strategy] if how.strategy else ["tensor", "channel"]
    strategy = next((s for s in strategies if tuple(scale.shape) in shapes[s]), None)
    if strategy is None:
        expected = " or ".join(str(list(s)) for st in strategies for s in shapes[st])
        raise CheckpointError(f"{scale.file}: scale {scale_name!r} has shape {list(scale.shape)}; the weight "
                              f"{list(weight.shape)} with {'/'.join(strategies)} scales needs {expected}")
    has_input = False
    if how.input_scale is not None:
        name = f"{module}.{how.input_scale}"
        info = stored.get(name)
        if info is None:
            raise CheckpointError(f"{weight.file}: fp8 weight {module + '.weight'!r} has no activation scale {name!r} "
                                  f"({quantization.source} declares static activation scales)")
        if tuple(info.shape) not in ((), (1,)) or info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: activation scale {name!r} is {info.dtype} {list(info.shape)}; "
                                  "only one float per tensor is supported")
        has_input = True
    return StoredLinear(strategy, how.block if strategy == "block" else None, has_input)
