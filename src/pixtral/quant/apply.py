"""Swap a Pixtral decoder's linear layers for quantized ones, in place (before or after tensor-parallel sharding).

`quantize_linears(model, "int8")` / `(model, "fp8")` replaces the decoder's projections --
attention `wq`, `wk`, `wv`, `wo` and feed-forward `w1`, `w2`, `w3` of `model.layers` -- and,
when asked, the output head. The vision encoder and the adapter stay as they are (float), as the
issue asks unless a checkpoint quantizes them.

Tensor parallelism: quantize *after* `shard_model`. A column-parallel projection of a rank is a
plain `nn.Linear` (replaced like any other); a row-parallel one is a `RowParallel` wrapper, whose
inner linear is replaced (`set_inner`), so the all-reduce and the bias-after stay. Parameter
names do not change (`layers.0.attention.wo.weight`, plus `...wo.weight_scale`). The per-channel
scales of a row-parallel weight are then those of the rank's columns (a finer quantization than
the whole row's, so a TP=2 quantized model is close to, not equal to, the TP=1 one). The other
order (quantize, then `shard_model`) is refused by `shard_model` (the quantized model has
`weight_scale` parameters the plan does not know). A vocabulary-parallel output head is not
quantized (refused).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pixtral.quant.linear import Fp8Linear, Int8WeightLinear

DECODER_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
SCHEMES = {"int8": Int8WeightLinear, "fp8": Fp8Linear}


def quantize_linears(model: nn.Module, scheme: str, modules: tuple[str, ...] = DECODER_LINEARS, *,
                     output: bool = False, per_channel: bool = True) -> list[str]:
    """Quantize `model.layers.*.{attention,feed_forward}.{modules}` (and `model.output` if `output`) in place.

    `scheme`: "int8" (`Int8WeightLinear`) or "fp8" (`Fp8Linear`); `per_channel`: one scale per
    output row (else one per tensor). Returns the names of the quantized modules. Modules already
    quantized, or not linear, are left alone.
    """
    from pixtral.parallel.tensor_parallel import RowParallel  # the parallel package imports the model

    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    cls = SCHEMES[scheme]
    done = []
    targets = [(f"layers.{name}", m) for name, m in model.layers.named_modules()
               if name.rpartition(".")[2] in modules]
    if output:
        if not isinstance(model.output, tuple(SCHEMES.values())) and type(model.output) is not nn.Linear:
            raise ValueError(f"cannot quantize an output head of type {type(model.output).__name__} "
                             "(a vocabulary-parallel head is not supported)")
        targets.append(("output", model.output))
    for name, module in targets:
        linear = module.inner if isinstance(module, RowParallel) else module
        if type(linear) is nn.Linear:
            replace_linear(model, name, lambda m: cls.from_linear(m, per_channel=per_channel))
            done.append(name)
    return done


def replace_linear(model: nn.Module, name: str, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace the plain linear `name` by `make(linear)`; inside a `RowParallel` wrapper, its inner one.

    On a meta model (the loader's way) `make` builds the empty quantized module that loading fills.
    Refuses anything else (a vocabulary-parallel head, a module already replaced), naming it.
    """
    from pixtral.parallel.tensor_parallel import RowParallel

    module = model.get_submodule(name)
    if isinstance(module, RowParallel) and type(module.inner) is nn.Linear:
        module.set_inner(make(module.inner))
        return
    if type(module) is not nn.Linear:
        raise ValueError(f"cannot quantize {name!r}: it is a {type(module).__name__}, not a linear layer "
                         "(a tensor-parallel output head is vocabulary-parallel and stays float)")
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, make(module))
