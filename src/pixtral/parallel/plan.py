"""Which slice of each parameter a tensor-parallel rank holds, for a model config and a size.

Megatron's split, as in vLLM, SGLang and gpt-fast:

- **column-parallel** (rows of the weight, i.e. output features, split; no communication):
  `wq`, `wk`, `wv` by whole heads, the FFN's `w1`/`w3` (gate/up) by `hidden_dim`;
- **row-parallel** (columns, i.e. input features, split; one all-reduce of the output): the
  attention's `wo` and the FFN's `w2`;
- **vocabulary-parallel**: `tok_embeddings` and `output` by vocabulary rows, rank r holding
  [r V/tp, (r+1) V/tp);
- **replicated**: the RMSNorm weights.

Query heads are split evenly. Key/value heads too when there are at least as many as ranks;
with fewer (n_kv_heads < tp, tp a multiple of n_kv_heads) each KV head is replicated on
tp / n_kv_heads consecutive ranks, the ones whose query heads read it, as in vLLM.

The vision encoder is split the same way when its heads and FFN width divide by the size, and
replicated otherwise; the adapter (`w_in` column-, `w_out` row-parallel, its bias added once
after the all-reduce) when the decoder's `dim` divides. `patch_conv`, `ln_pre`, the
pre-projector norm and the patch merger are always replicated (small).

Everything here is arithmetic on the config: no torch.distributed, no tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pixtral.errors import ConfigError
from pixtral.model.args import ModelArgs


@dataclass(frozen=True)
class Split:
    """A rank's part of one parameter: indices [start, stop) along `dim` (0: rows, 1: columns)."""

    dim: int
    start: int
    stop: int


def tensor_parallel_problems(args: ModelArgs, size: int) -> list[str]:
    """Why the decoder cannot be split over `size` ranks (empty: it can)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return [f"the tensor-parallel size must be a positive integer, got {size!r}"]
    problems = []
    if args.n_heads % size:
        if size > args.n_heads:
            problems.append(f"the tensor-parallel size {size} is larger than n_heads ({args.n_heads}): "
                            "every rank needs at least one attention head")
        else:
            problems.append(f"n_heads ({args.n_heads}) is not divisible by the tensor-parallel size {size}")
    kv = args.n_kv_heads
    if kv >= size and kv % size:
        problems.append(f"n_kv_heads ({kv}) is not divisible by the tensor-parallel size {size}")
    elif kv < size and size % kv:
        problems.append(f"the tensor-parallel size {size} is not a multiple of n_kv_heads ({kv}) (with fewer "
                        "KV heads than ranks, each KV head is replicated on size / n_kv_heads ranks)")
    if args.hidden_dim % size:
        problems.append(f"hidden_dim ({args.hidden_dim}) is not divisible by the tensor-parallel size {size}")
    if args.vocab_size % size:
        problems.append(f"vocab_size ({args.vocab_size}) is not divisible by the tensor-parallel size {size}")
    return problems


def check_tensor_parallel(args: ModelArgs, size: int, source: str = "this model") -> None:
    """Raise ConfigError naming every number that rules out `size` ranks."""
    problems = tensor_parallel_problems(args, size)
    if problems:
        raise ConfigError(f"cannot split {source} over {size!r} tensor-parallel ranks: " + "; ".join(problems))


def vision_sharded(args: ModelArgs, size: int) -> bool:
    v = args.vision
    return v is not None and size > 1 and v.num_attention_heads % size == 0 and v.intermediate_size % size == 0


def adapter_sharded(args: ModelArgs, size: int) -> bool:
    return args.vision is not None and size > 1 and args.dim % size == 0


def vision_choice(args: ModelArgs, size: int) -> str:
    """One line stating how the vision encoder and the adapter run at this size, and why."""
    v = args.vision
    if v is None:
        return "no vision encoder"
    if size == 1:
        return "vision encoder and adapter whole (tensor-parallel size 1)"
    if vision_sharded(args, size):
        enc = (f"vision encoder sharded: {v.num_attention_heads // size} of {v.num_attention_heads} heads and "
               f"{v.intermediate_size // size} of {v.intermediate_size} FFN features per rank")
    else:
        why = []
        if v.num_attention_heads % size:
            why.append(f"num_attention_heads ({v.num_attention_heads})")
        if v.intermediate_size % size:
            why.append(f"intermediate_size ({v.intermediate_size})")
        enc = (f"vision encoder replicated ({' and '.join(why)} not divisible by {size}); "
               "each rank encodes a share of the images and broadcasts their features")
    if adapter_sharded(args, size):
        ada = f"adapter sharded ({args.dim // size} of {args.dim} features per rank)"
    else:
        ada = f"adapter replicated (dim ({args.dim}) not divisible by {size})"
    return f"{enc}; {ada}"


class TensorParallelPlan:
    """The split of every parameter of `Pixtral(args)` over `size` ranks; refuses an impossible size.

    Local sizes (the same on every rank): `n_heads`, `n_kv_heads`, `hidden_dim`, `vocab_size`,
    and for the vision encoder `vision_heads`, `vision_intermediate`.
    """

    def __init__(self, args: ModelArgs, size: int, source: str = "this model"):
        check_tensor_parallel(args, size, source)
        self.args, self.size = args, size
        self.n_heads = args.n_heads // size
        self.kv_replicas = size // args.n_kv_heads if args.n_kv_heads < size else 1
        self.n_kv_heads = max(args.n_kv_heads // size, 1)
        self.hidden_dim = args.hidden_dim // size
        self.vocab_size = args.vocab_size // size
        self.vision_sharded = vision_sharded(args, size)
        self.adapter_sharded = adapter_sharded(args, size)
        v = args.vision
        if v is not None:
            parts = size if self.vision_sharded else 1
            self.vision_heads = v.num_attention_heads // parts
            self.vision_intermediate = v.intermediate_size // parts

    # ------------------------------------------------------------------ per rank
    def kv_heads(self, rank: int) -> tuple[int, int]:
        """[first, last) global KV heads that `rank` holds (its query heads read only these)."""
        self._check_rank(rank)
        if self.kv_replicas > 1:
            head = rank // self.kv_replicas
            return head, head + 1
        return rank * self.n_kv_heads, (rank + 1) * self.n_kv_heads

    def vocab_range(self, rank: int) -> tuple[int, int]:
        self._check_rank(rank)
        return rank * self.vocab_size, (rank + 1) * self.vocab_size

    def splits(self, rank: int) -> dict[str, Split | None]:
        """Every parameter name of `Pixtral(args)` -> the rank's slice (None: held whole)."""
        self._check_rank(rank)
        a, r = self.args, rank

        def part(dim: int, n: int) -> Split:  # the rank's r-th of equal parts of n each
            return Split(dim, r * n, (r + 1) * n)

        kv0, kv1 = self.kv_heads(rank)
        out: dict[str, Split | None] = {
            "tok_embeddings.weight": part(0, self.vocab_size),
            "norm.weight": None,
            "output.weight": part(0, self.vocab_size),
        }
        q = part(0, self.n_heads * a.head_dim)
        kv = Split(0, kv0 * a.head_dim, kv1 * a.head_dim)
        o = part(1, self.n_heads * a.head_dim)
        up, down = part(0, self.hidden_dim), part(1, self.hidden_dim)
        for i in range(a.n_layers):
            out.update(self._block(f"layers.{i}.", q, kv, kv, o, up, down))
        v = a.vision
        if v is None:
            return out
        out["vision_encoder.patch_conv.weight"] = None
        out["vision_encoder.ln_pre.weight"] = None
        if self.vision_sharded:
            width = self.vision_heads * v.head_dim
            vq, vo = part(0, width), part(1, width)
            vup, vdown = part(0, self.vision_intermediate), part(1, self.vision_intermediate)
        else:
            vq = vo = vup = vdown = None
        for i in range(v.num_hidden_layers):
            out.update(self._block(f"vision_encoder.transformer.layers.{i}.", vq, vq, vq, vo, vup, vdown))
        if v.add_pre_mm_projector_layer_norm:
            out["pre_mm_projector_norm.weight"] = None
        if v.uses_patch_merger:
            out["patch_merger.merging_layer.weight"] = None
        local_dim = a.dim // self.size
        w_in = part(0, local_dim) if self.adapter_sharded else None
        w_out = part(1, local_dim) if self.adapter_sharded else None
        out["vision_language_adapter.w_in.weight"] = w_in
        out["vision_language_adapter.w_out.weight"] = w_out
        if v.adapter_bias:
            out["vision_language_adapter.w_in.bias"] = w_in  # rows of w_in: its bias goes with them
            out["vision_language_adapter.w_out.bias"] = None  # added once, after the all-reduce
        return out

    @staticmethod
    def _block(prefix, q, k, v, o, up, down) -> dict[str, Split | None]:
        return {
            prefix + "attention.wq.weight": q, prefix + "attention.wk.weight": k,
            prefix + "attention.wv.weight": v, prefix + "attention.wo.weight": o,
            prefix + "attention_norm.weight": None, prefix + "ffn_norm.weight": None,
            prefix + "feed_forward.w1.weight": up, prefix + "feed_forward.w2.weight": down,
            prefix + "feed_forward.w3.weight": up,
        }

    def local_args(self) -> ModelArgs:
        """The rank's `ModelArgs`: its own head counts and FFN width, everything else global.

        `n_heads`, `n_kv_heads` and `hidden_dim` are the rank's (what its modules hold and what an
        engine sizes a KV cache by: `n_layers x n_kv_heads x head_dim` per token, the rank's KV
        heads only). `dim`, `head_dim`, `vocab_size` (the width of the logits, gathered whole on
        every rank), `n_layers`, `max_seq_len`, RoPE and norms are the model's. `vision` is the
        model's own `VisionArgs`, untouched: image geometry and token counts do not change, and
        the vision head_dim is derived from hidden_size / num_attention_heads, so a sharded
        encoder's local head count lives on its attention modules (`n_heads`) instead.
        """
        return dataclasses.replace(self.args, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                                   hidden_dim=self.hidden_dim)

    def describe(self) -> list[str]:
        """Human-readable lines: what each rank holds (for docs and logs)."""
        a = self.args
        kv = (f"{self.n_kv_heads} of {a.n_kv_heads} KV heads" if self.kv_replicas == 1 else
              f"1 of {a.n_kv_heads} KV heads, each replicated on {self.kv_replicas} ranks")
        return [
            f"tensor-parallel size {self.size}: per rank {self.n_heads} of {a.n_heads} query heads, {kv}, "
            f"{self.hidden_dim} of {a.hidden_dim} FFN features, {self.vocab_size} of {a.vocab_size} vocabulary rows",
            vision_choice(a, self.size),
        ]

    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or not 0 <= rank < self.size:
            raise ValueError(f"rank {rank!r} is outside 0..{self.size - 1} (tensor-parallel size {self.size})")
