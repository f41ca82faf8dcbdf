"""Load a checkpoint of either layout straight onto the target device and dtype.

The model is built on the meta device (no memory), then each tensor is read from its file,
permuted if it comes from the HF layout, cast (or quantized) and moved to the device on its own,
so the peak host memory is one tensor, not a second copy of the model. Quantized linears are
swapped in on the meta model first: the fp8 ones a checkpoint stores, or the decoder's when a
float checkpoint is quantized while loading.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pixtral.checkpoint.files import find_files, read_args
from pixtral.checkpoint.reader import TensorReader
from pixtral.errors import CheckpointError
from pixtral.model.pixtral import Pixtral
from pixtral.quant.apply import SCHEMES, quantize_linears, replace_linear
from pixtral.quant.linear import Fp8Linear, QuantizedLinear


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _check_memory(n_bytes: int, device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cpu":
        return
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if n_bytes > total:
        raise CheckpointError(
            f"the model needs {n_bytes / 2**30:.1f} GiB in {dtype} but this machine has "
            f"{total / 2**30:.1f} GiB of memory; choose a smaller dtype (e.g. bfloat16) or a GPU"
        )


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, quantization: str | None = None) -> Pixtral:
    """Load a Pixtral checkpoint (Mistral-native or Hugging Face layout, detected); None: the default model.

    `quantization`: None, "fp8" or "int8". A float checkpoint with a scheme gets its decoder
    linears quantized as they are read (`pixtral.quant.DECODER_LINEARS`, per output channel: the
    same weights as `quantize_linears` on the float model, never a float copy of the model). A
    pre-quantized checkpoint (fp8, detected from its config) loads as stored, with None or its own
    scheme; asking it for another one is refused. The model says what it runs: `model.quantization`
    ("fp8", "int8" or None), `model.quantization_source` ("checkpoint", "on load" or None) and
    `model.quantization_format` (the checkpoint's format, e.g. "compressed-tensors", or None).
    """
    if path is None:
        from pixtral.assets import default_model_dir

        path = default_model_dir()
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    files = find_files(path)
    args = read_args(files)
    reader = TensorReader(files, args)  # all checks on headers, before any allocation
    with torch.device("meta"):
        model = Pixtral(args)
    swap_quantized_linears(model, reader, quantization, str(files.root))
    _check_memory(model_bytes(model, dtype), device, dtype)
    fill_parameters(model, reader, device, dtype)
    return model


def swap_quantized_linears(model: nn.Module, reader: TensorReader, quantization: str | None, source: str) -> None:
    """Swap the meta model's linears for the quantized ones it will hold, and record what it runs."""
    stored = reader.quantization
    if quantization is not None and quantization not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {quantization!r}; choose one of: {', '.join(SCHEMES)}")
    if stored is not None and quantization not in (None, stored.scheme):
        raise CheckpointError(f"{source}: the checkpoint is quantized as {stored.scheme} ({stored.method}); "
                              f"it cannot be loaded as {quantization} (leave the quantization unset to load it as stored)")
    if stored is not None:
        for name, linear in reader.linears.items():
            replace_linear(model, name, lambda m, lin=linear: Fp8Linear(
                m.in_features, m.out_features, bias=m.bias is not None, device="meta", bias_dtype=m.weight.dtype,
                per_channel=lin.strategy == "channel", block_size=lin.block, input_scale=lin.input_scale))
        model.quantization, model.quantization_source, model.quantization_format = stored.scheme, "checkpoint", stored.method
    elif quantization is not None:
        quantize_linears(model, quantization)  # on meta: the empty quantized modules, filled as each weight is read
        model.quantization, model.quantization_source, model.quantization_format = quantization, "on load", None
    else:
        model.quantization = model.quantization_source = model.quantization_format = None


def model_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """What the loaded model will hold: quantized weights and their scales in their dtypes, the rest in `dtype`."""
    quantized = {id(p) for m in quantized_modules(model).values()
                 for key, p in m._parameters.items() if key != "bias" and p is not None}
    return sum(p.numel() * (p.element_size() if id(p) in quantized else dtype.itemsize) for p in model.parameters())


def fill_parameters(model: nn.Module, reader: TensorReader, device: torch.device, dtype: torch.dtype,
                    read=None) -> None:
    """Fill a meta-device model from the reader, one tensor at a time, and set it up for inference.

    `read(name)` gives each parameter's tensor (default: the whole stored tensor; a tensor-parallel
    rank passes one that reads its slice). The reader is closed at the end. A quantized module's
    stored fp8 weight and its scales keep their dtypes (scales widened to float32, exactly); a
    float weight of a quantized module is cast to `dtype`, then quantized (its scale set with it).
    """
    read = read or reader.read
    params = dict(model.named_parameters())
    quantized = quantized_modules(model)
    try:
        for ours, (stored_name, info) in reader.tensors.items():
            tensor = read(ours)
            module_name, _, leaf = ours.rpartition(".")
            module = quantized.get(module_name)
            scale = module is not None and leaf in ("weight_scale", "input_scale")  # stored [out, 1] or [1] fit too
            if (tensor.numel() != params[ours].numel()) if scale else (tensor.shape != params[ours].shape):
                # the reader checked the file: a model/plan mismatch is ours
                raise AssertionError(f"{ours}: read {tuple(tensor.shape)}, the model holds {tuple(params[ours].shape)}")
            if module is None or leaf == "bias":
                _set_parameter(model, ours, tensor.to(device=device, dtype=dtype))
            elif scale:  # [out, 1] -> [out], [1] -> []: the module's shapes
                _set_parameter(model, ours, tensor.to(device=device, dtype=torch.float32).reshape(params[ours].shape))
            elif tensor.dtype == module.quantized_dtype:  # stored quantized: as it is
                _set_parameter(model, ours, tensor.to(device=device))
            else:  # quantized while loading, from the weight the float model would hold
                q, scale = module.quantize(tensor.to(dtype), module.per_channel)
                _set_parameter(model, ours, q.to(device))
                _set_parameter(model, module_name + ".weight_scale", scale.to(device))
            del tensor
    finally:
        reader.close()
    model.eval()
    model.requires_grad_(False)


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The quantized linears by name, those inside a tensor-parallel wrapper (`RowParallel.inner`) too."""
    out = {}
    for name, m in model.named_modules():
        m = getattr(m, "inner", m)  # a wrapper shares its inner module's parameters, under its own name
        if isinstance(m, QuantizedLinear):
            out[name] = m
    return out


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
