"""The split plan: refusals naming the numbers, slices that tile each weight, KV heads that follow
their query heads, the vision encoder's choice per preset. Pure arithmetic: no processes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pixtral.errors import ConfigError
from pixtral.model import ModelArgs, Pixtral, preset
from pixtral.parallel import TensorParallelPlan, check_tensor_parallel, vision_choice

from .conftest import CHECKPOINTS, tp_args

RELEASED = ("pixtral-12b-2409", "pixtral-large-2411", "mistral-small-3.1")


def test_refuses_heads_not_divisible_naming_every_number():
    with pytest.raises(ConfigError) as err:
        check_tensor_parallel(preset("pixtral-12b-2409"), 3)
    msg = str(err.value)
    assert "over 3 tensor-parallel ranks" in msg
    assert "n_heads (32) is not divisible by the tensor-parallel size 3" in msg
    assert "n_kv_heads (8) is not divisible by the tensor-parallel size 3" in msg
    assert "hidden_dim (14336) is not divisible by the tensor-parallel size 3" in msg
    assert "vocab_size (131072) is not divisible by the tensor-parallel size 3" in msg


def test_refuses_more_ranks_than_heads():
    with pytest.raises(ConfigError, match=r"the tensor-parallel size 8 is larger than n_heads \(4\)"):
        TensorParallelPlan(preset("tiny"), 8)


def test_refuses_vocab_not_divisible():
    args = dataclasses.replace(preset("tiny"), vocab_size=131073)
    with pytest.raises(ConfigError, match=r"vocab_size \(131073\) is not divisible by the tensor-parallel size 2"):
        TensorParallelPlan(args, 2)


def test_refuses_kv_heads_that_cannot_be_split_or_replicated():
    args = ModelArgs(dim=64, n_layers=1, head_dim=16, hidden_dim=96, n_heads=24, n_kv_heads=6, vocab_size=96, vision=None)
    with pytest.raises(ConfigError, match=r"n_kv_heads \(6\) is not divisible by the tensor-parallel size 4"):
        TensorParallelPlan(args, 4)
    args = dataclasses.replace(args, n_kv_heads=3)
    with pytest.raises(ConfigError, match=r"the tensor-parallel size 8 is not a multiple of n_kv_heads \(3\)"):
        TensorParallelPlan(args, 8)
    TensorParallelPlan(args, 6)  # 3 KV heads on 6 ranks: each on 2


@pytest.mark.parametrize("size", [0, -2, True, 2.0, "2"])
def test_refuses_a_size_that_is_not_a_positive_integer(size):
    with pytest.raises(ConfigError, match="must be a positive integer"):
        TensorParallelPlan(preset("tiny"), size)


def test_released_presets_split_2_4_8_ways_with_the_vision_encoder_sharded():
    for name in RELEASED:
        for size in (2, 4, 8):
            plan = TensorParallelPlan(preset(name), size)
            assert plan.vision_sharded and plan.adapter_sharded, (name, size)
            assert vision_choice(preset(name), size).startswith("vision encoder sharded"), (name, size)
    large = TensorParallelPlan(preset("pixtral-large-2411"), 8)
    assert (large.n_heads, large.n_kv_heads, large.hidden_dim, large.vocab_size) == (12, 1, 3584, 4096)
    assert (large.vision_heads, large.vision_intermediate) == (2, 768)


def test_vision_choice_states_why_it_replicates():
    line = vision_choice(preset("tiny"), 4)
    assert "vision encoder replicated (num_attention_heads (2) not divisible by 4)" in line
    assert "adapter sharded (16 of 64 features per rank)" in line
    line = vision_choice(tp_args("mistral_kv1"), 2)
    assert "intermediate_size (63)" in line and "adapter replicated (dim (65) not divisible by 2)" in line


def _full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in Pixtral(args).named_parameters()}


@pytest.mark.parametrize("name,size", [(n, s) for n in RELEASED for s in (2, 4, 8)]
                         + [("tiny", 2), ("tiny", 4), *((c, 2) for c in CHECKPOINTS)])
def test_slices_tile_every_weight(name, size):
    """Every parameter is named; a sharded one is cut into `size` disjoint equal parts covering it
    (KV heads replicated on several ranks: each part on tp / n_kv_heads ranks)."""
    args = preset(name) if name in RELEASED or name == "tiny" else tp_args(name)
    plan = TensorParallelPlan(args, size)
    shapes = _full_shapes(args)
    per_rank = [plan.splits(r) for r in range(size)]
    assert all(set(s) == set(shapes) for s in per_rank)
    for pname, shape in shapes.items():
        parts = [s[pname] for s in per_rank]
        if parts[0] is None:
            assert all(p is None for p in parts), pname
            continue
        dim = parts[0].dim
        distinct = sorted({(p.start, p.stop) for p in parts})
        assert all(p.dim == dim for p in parts)
        assert distinct[0][0] == 0 and distinct[-1][1] == shape[dim], pname
        assert all(a[1] == b[0] for a, b in zip(distinct, distinct[1:])), pname  # contiguous, disjoint
        copies = size // len(distinct)
        assert copies == (plan.kv_replicas if pname.endswith(("attention.wk.weight", "attention.wv.weight"))
                          and pname.startswith("layers.") else 1), pname


@pytest.mark.parametrize("n_heads,n_kv_heads,size", [(32, 8, 2), (32, 8, 8), (96, 8, 8), (96, 8, 16), (4, 1, 2),
                                                     (4, 2, 4), (12, 3, 6)])
def test_each_rank_holds_the_kv_heads_its_query_heads_read(n_heads, n_kv_heads, size):
    """Global grouping: query head h reads KV head h // (n_heads / n_kv_heads). On a rank, local query
    head j reads local KV head j // (local n_heads / local n_kv_heads): the same head."""
    args = ModelArgs(dim=64, n_layers=1, head_dim=16, hidden_dim=64 * size, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     vocab_size=64 * size, vision=None)
    plan = TensorParallelPlan(args, size)
    for rank in range(size):
        kv0, kv1 = plan.kv_heads(rank)
        assert kv1 - kv0 == plan.n_kv_heads
        for j in range(plan.n_heads):
            h = rank * plan.n_heads + j
            assert h // (n_heads // n_kv_heads) == kv0 + j // (plan.n_heads // plan.n_kv_heads)


def test_local_args_keep_global_what_is_not_split():
    args = preset("pixtral-large-2411")
    local = TensorParallelPlan(args, 8).local_args()
    assert (local.n_heads, local.n_kv_heads, local.hidden_dim) == (12, 1, 3584)
    assert (local.dim, local.head_dim, local.vocab_size, local.n_layers, local.max_seq_len) == \
        (args.dim, args.head_dim, args.vocab_size, args.n_layers, args.max_seq_len)
    assert local.vision == args.vision
    local.validate()  # still a consistent config
