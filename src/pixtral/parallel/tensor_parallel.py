"""Turn a `Pixtral` into one rank's part of a tensor-parallel model, from outside its modules.

As in gpt-fast's `tp.py`: the model keeps its one code path (`pixtral.model`); `shard_model`
walks it once and

- swaps each split linear for one of the rank's size: a plain `nn.Linear` for a column-parallel
  one (its output is the rank's heads or FFN features, nothing to communicate), a
  `RowParallel` around one (all-reduce of the output, bias after) for `wo`, `w2` and the
  adapter's `w_out` (`RowParallel` wraps any linear module, quantized ones too: see `pixtral.quant`);
- swaps `tok_embeddings` for a `VocabParallelEmbedding` (look up the rank's vocabulary rows,
  zeros elsewhere, all-reduce) and `output` for a `VocabParallelHead` (the rank's vocabulary
  columns of the logits, all-gathered, so every rank returns the full logits);
- sets the attention modules' head counts to the rank's and `model.args` to the rank's args
  (`TensorParallelPlan.local_args`);
- when the vision encoder is replicated, lets each rank encode a share of a request's images and
  broadcast their features (`SpreadImagesVisionTransformer`).

Parameter names are unchanged (`layers.0.attention.wo.weight` is the rank's slice of that
weight), so the loader fills the rank's model by the same names. Modules that are swapped keep
their type's behaviour besides the communication, so `engine.fusion.fuse` still fuses the
column-parallel q/k/v and gate/up of a rank (they stay plain `nn.Linear`s) and leaves the
row-parallel ones alone.

Per decoder layer the ranks exchange two all-reduces of [tokens, dim] (after `wo` and `w2`);
per forward one more for the embeddings and one all-gather of the logits; a sharded vision
encoder adds two per encoder layer and the sharded adapter one. Every rank must run the same
calls with the same inputs (token ids, images, attention context), in the same order.

The collectives are the in-place `torch.distributed` ones: inference only (no autograd through
them), capturable in CUDA graphs with NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pixtral.model.decoder import Attention
from pixtral.model.pixtral import Pixtral
from pixtral.model.vision_encoder import VisionAttention, VisionTransformer
from pixtral.parallel.plan import Split, TensorParallelPlan


@dataclass
class TensorParallelInfo:
    """Attached to a rank's model as `model.tensor_parallel`."""

    rank: int
    size: int
    plan: TensorParallelPlan
    group: object = None  # the torch.distributed group; None: the default (world) group
    spread_images: bool = False
    # Filled by `load_tp_model`: what this rank read from the checkpoint.
    bytes_read: int = 0
    read_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class RowParallel(nn.Module):
    """Input features split over the ranks: any linear module's partial products, summed by one all-reduce.

    `RowParallel(inner)` runs `inner` without its bias (`linear_without_bias`), all-reduces the
    output over `group`, then adds the bias (replicated) once. `inner` is a plain `nn.Linear` or a
    quantized linear (`pixtral.quant`): the all-reduce is the same whatever computes the partial
    product, so sharding and quantization compose.

    Parameter names stay those of a linear (`wo.weight`, `wo.bias`, and a quantized inner's
    `wo.weight_scale`), not `wo.inner.weight`: the wrapper shares `inner`'s parameter and buffer
    dicts instead of registering `inner` as a child, so the loader, `state_dict` and
    `named_parameters` see the linear's names, and a parameter set on either module (the loader
    writes `module._parameters[name]`) is the other's too. `set_inner` swaps the computation (e.g.
    for a quantized one) and re-shares. Device and dtype moves go through `inner` (a quantized
    linear keeps its weight dtype).
    """

    group = None

    def __init__(self, inner: nn.Module, group=None):
        super().__init__()
        self.group = group
        self.set_inner(inner)

    @property
    def inner(self) -> nn.Module:
        return self.__dict__["_inner"]

    def set_inner(self, inner: nn.Module) -> None:
        self.__dict__["_inner"] = inner  # not a child: its tensors are ours (the shared dicts)
        self._parameters = inner._parameters
        self._buffers = inner._buffers
        self.training = inner.training

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        return self.inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear_without_bias(self.inner, x)
        dist.all_reduce(out, group=self.group)
        bias = self._parameters.get("bias")
        return out if bias is None else out + bias

    def _apply(self, fn, recurse=True):
        self.inner._apply(fn, recurse)  # the dicts are shared: our tensors are moved with its
        return self

    def train(self, mode: bool = True):
        self.inner.train(mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"{self.inner!r}"


RowParallelLinear = RowParallel  # the name the loader's tests and earlier code use


def linear_without_bias(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` less its bias: a plain `nn.Linear`'s `F.linear(x, weight)`, or the module's own
    `linear_without_bias` (the quantized linears of `pixtral.quant` have one)."""
    own = getattr(type(module), "linear_without_bias", None)
    if own is not None:
        return own(module, x)
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight)
    raise TypeError(f"{type(module).__name__} has no linear_without_bias: cannot run it row-parallel")


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_stop) of the embedding; the other ids look up zeros, then all-reduce."""

    group = None
    vocab_start = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelHead(nn.Linear):
    """The rank's vocabulary rows of the output head; the logits are all-gathered along the vocabulary."""

    group = None
    size = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)


class SpreadImagesVisionTransformer(VisionTransformer):
    """A replicated vision encoder that encodes only this rank's share of the images.

    Images are dealt to ranks by patch count (largest first, to the least loaded rank; every rank
    computes the same deal), each rank encodes its own, and each rank's features are broadcast to
    the others: every rank returns what the whole encoder would, having encoded about 1/size.
    """

    tp_rank = 0
    tp_size = 1
    group = None

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        if len(images) < 2:
            return super().forward(images)
        grids = [self.grid(image) for image in images]
        counts = [h * w for h, w in grids]
        owner = deal(counts, self.tp_size)
        weight = self.patch_conv.weight
        mine = [i for i, o in enumerate(owner) if o == self.tp_rank]
        own = super().forward([images[i] for i in mine])[0] if mine else None
        buffers = []
        for src in range(self.tp_size):
            n = sum(c for c, o in zip(counts, owner) if o == src)
            buf = own if src == self.tp_rank and own is not None else torch.empty(
                n, self.args.hidden_size, device=weight.device, dtype=weight.dtype)
            if n:
                dist.broadcast(buf, src=_global_rank(self.group, src), group=self.group)
            buffers.append(list(buf.split([c for c, o in zip(counts, owner) if o == src])))
        return torch.cat([buffers[o].pop(0) for o in owner]), grids


def deal(counts: list[int], size: int) -> list[int]:
    """Owner rank of each image: largest first, each to the rank with the fewest patches so far."""
    load, owner = [0] * size, [0] * len(counts)
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += counts[i]
    return owner


def _global_rank(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def shard_model(model: Pixtral, rank: int, size: int, group=None, spread_images: bool = True,
                plan: TensorParallelPlan | None = None) -> Pixtral:
    """Make `model` (in place) rank `rank`'s part of a `size`-way tensor-parallel model; returns it.

    Works on a model on the meta device (the loader's way: the slices are then read from the
    checkpoint by `load_tp_model`) and on a materialised one (each weight is sliced, as gpt-fast
    does). `group`: the torch.distributed group of the `size` ranks (None: the default group);
    it is needed only when the model runs. `spread_images`: when the vision encoder is
    replicated, each rank encodes a share of the images (see `SpreadImagesVisionTransformer`).
    """
    plan = plan or TensorParallelPlan(model.args, size)
    if plan.size != size:
        raise ValueError(f"the plan is for {plan.size} ranks, not {size}")
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("this model is already sharded")
    splits = plan.splits(rank)  # checks the rank
    if size == 1:  # the whole model: nothing to split, nothing to communicate
        model.tensor_parallel = TensorParallelInfo(rank, size, plan, group)
        return model
    names = {name for name, _ in model.named_parameters()}
    if names != set(splits):
        raise ValueError(f"the plan does not match the model's parameters: {sorted(names ^ set(splits))[:5]}")

    for name, module in list(model.named_modules()):
        if name == "output":  # vocabulary-parallel: below
            continue
        if isinstance(module, nn.Linear) and splits.get(name + ".weight") is not None:
            split = splits[name + ".weight"]
            new = _resized(nn.Linear, module, name, splits)
            _replace(model, name, RowParallel(new, group) if split.dim == 1 else new)
        elif isinstance(module, Attention):
            module.n_heads, module.n_kv_heads = plan.n_heads, plan.n_kv_heads
        elif isinstance(module, VisionAttention) and plan.vision_sharded:
            module.n_heads = plan.vision_heads

    emb = model.tok_embeddings
    new_emb = VocabParallelEmbedding(plan.vocab_size, emb.embedding_dim, device="meta", dtype=emb.weight.dtype)
    new_emb.weight = _local(emb.weight, splits["tok_embeddings.weight"])
    new_emb.group, new_emb.vocab_start = group, plan.vocab_range(rank)[0]
    model.tok_embeddings = new_emb

    head = _resized(VocabParallelHead, model.output, "output", splits)
    head.group, head.size = group, size
    model.output = head

    spread = spread_images and model.args.vision is not None and not plan.vision_sharded
    if spread:
        enc = model.vision_encoder
        enc.__class__ = SpreadImagesVisionTransformer
        enc.tp_rank, enc.tp_size, enc.group = rank, size, group

    model.args = plan.local_args()
    model.tensor_parallel = TensorParallelInfo(rank, size, plan, group, spread)
    return model


def _local(param: torch.Tensor, split: Split | None) -> nn.Parameter:
    """The rank's part of `param`: sliced when it holds values, an empty meta tensor otherwise."""
    if split is None:
        return param if isinstance(param, nn.Parameter) else nn.Parameter(param, requires_grad=False)
    n = split.stop - split.start
    if param.is_meta:
        shape = list(param.shape)
        shape[split.dim] = n
        value = torch.empty(shape, device="meta", dtype=param.dtype)
    else:
        value = param.detach().narrow(split.dim, split.start, n).clone()
    return nn.Parameter(value, requires_grad=param.requires_grad)


def _resized(cls: type[nn.Linear], old: nn.Linear, name: str, splits: dict[str, Split | None]) -> nn.Linear:
    weight = _local(old.weight, splits[name + ".weight"])
    new = cls(weight.shape[1], weight.shape[0], bias=old.bias is not None, device="meta", dtype=weight.dtype)
    new.weight = weight
    if old.bias is not None:
        new.bias = _local(old.bias, splits[name + ".bias"])
    new.train(old.training)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)
