"""The fused Triton kernels (RMSNorm, add + RMSNorm, RoPE, SiLU gate) against the eager code,
run on the CPU by Triton's interpreter (each test re-runs itself with `TRITON_INTERPRET=1`)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import random_model
from tests.triton_interpret import INTERPRETED
from tests.triton_interpret import rerun_interpreted as _rerun

pytest.importorskip("triton")
rerun_interpreted = functools.partial(_rerun, __file__)
DTYPES = [torch.float32, torch.bfloat16]


def close(actual, expected, dtype):
    # float32: arithmetic order only. bf16: the kernels round where the eager code rounds, but
    # Triton's interpreter casts float32 to bf16 by truncation (the GPU rounds to nearest), so
    # each rounding point may be one bf16 step off here: up to two steps, 2**-7 relative each.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 * 2**-7, atol=2e-2)
    torch.testing.assert_close(actual, expected, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_match_the_eager_code(dtype, request):
    if not INTERPRETED:
        return rerun_interpreted(request.node.name)
    from pixtral.engine import fused_ops

    torch.manual_seed(0)
    x, r = (torch.randn(7, 96).mul(3).to(dtype) for _ in range(2))  # 96 columns: a masked tail in the block
    weight = torch.rand(96).add(0.5).to(dtype)
    close(fused_ops.rms_norm(x, weight, 1e-5), fused_ops.rms_norm_eager(x, weight, 1e-5), dtype)
    h, normed = fused_ops.add_rms_norm(x, r, weight, 1e-5)
    if dtype == torch.float32:
        assert torch.equal(h, x + r)  # the residual sum is the eager add's
    close(h, x + r, dtype)
    close(normed, fused_ops.rms_norm_eager(x + r, weight, 1e-5), dtype)
    assert normed.dtype == dtype and h.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_the_eager_code_on_a_strided_view(dtype, request):
    if not INTERPRETED:
        return rerun_interpreted(request.node.name)
    from pixtral.engine import fused_ops
    from pixtral.model.rope import angles_1d, apply_rotary, rotations

    torch.manual_seed(0)
    tokens, q_heads, kv_heads, dim = 9, 5, 2, 16  # 5 heads: a partial program of heads
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * dim).to(dtype)
    q = qkv[:, : q_heads * dim].unflatten(-1, (q_heads, dim))  # a view, as after the fused q/k/v product
    k = qkv[:, q_heads * dim: (q_heads + kv_heads) * dim].unflatten(-1, (kv_heads, dim))
    rotation = rotations(angles_1d(torch.arange(100, 100 + tokens), dim, 1e6))
    for x in (q, k):
        assert not x.is_contiguous()
        out = fused_ops.rotary(x, rotation)
        assert out.dtype == dtype and out.shape == x.shape
        close(out, apply_rotary(x, rotation), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_gate_matches_the_eager_code(dtype, request):
    if not INTERPRETED:
        return rerun_interpreted(request.node.name)
    from pixtral.engine import fused_ops

    torch.manual_seed(0)
    gate_up = torch.randn(6, 2 * 80).mul(4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    out = fused_ops.silu_mul(gate_up)
    assert out.shape == (6, 80)
    close(out, F.silu(gate) * up, dtype)


def test_tensors_that_need_gradients_take_the_eager_path(request):
    if not INTERPRETED:
        return rerun_interpreted(request.node.name)
    from pixtral.engine import fused_ops

    x = torch.randn(4, 32, requires_grad=True)
    weight = torch.ones(32, requires_grad=True)
    out = fused_ops.rms_norm(x, weight, 1e-5)
    out.sum().backward()  # the kernels have no backward: training must not reach them
    assert x.grad is not None and torch.equal(out, fused_ops.rms_norm_eager(x, weight, 1e-5))


def model_and_prompt():
    model = random_model("tiny")
    images = [torch.randn(3, 32, 48), torch.randn(3, 16, 16)]
    slots = [model.image_token_id] * sum(model.image_token_counts(images))
    return model, torch.tensor([1] + slots + torch.randint(1000, 5000, (12,)).tolist()), images


def test_whole_model_with_fused_kernels_gives_the_same_logits(request, monkeypatch):
    if not INTERPRETED:
        return rerun_interpreted(request.node.name)
    from pixtral.engine import fused_ops
    from pixtral.engine.fusion import TritonFusedQKVAttention, TritonRMSNorm, TritonVisionBlock, fuse

    model, ids, images = model_and_prompt()
    with torch.no_grad():
        eager = model(ids, images)
        fuse(model)

        def refuse(*args):
            raise AssertionError("an eager fallback ran: every norm and rotation must take its kernel")

        monkeypatch.setattr(fused_ops, "rms_norm_eager", refuse)
        monkeypatch.setattr(fused_ops, "rotary_eager", refuse)
        fused = model(ids, images)
    assert isinstance(model.layers[0].attention, TritonFusedQKVAttention) and isinstance(model.norm, TritonRMSNorm)
    assert isinstance(model.vision_encoder.transformer.layers[0], TritonVisionBlock)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)  # float32 summation order only
    assert eager.std() > 0.5


def test_fused_projections_alone_give_the_same_logits_and_free_the_separate_weights():
    from pixtral.engine.fusion import FusedGateUpFeedForward, FusedQKVAttention, fuse

    model, ids, images = model_and_prompt()
    with torch.no_grad():
        before = model(ids, images)
        n_before = sum(p.numel() for p in model.parameters())
        fuse(model, projections=True, kernels=False)
        after = model(ids, images)
    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert type(attn) is FusedQKVAttention and not hasattr(attn, "wq")
    assert type(ffn) is FusedGateUpFeedForward and not hasattr(ffn, "w1")
    assert sum(p.numel() for p in model.parameters()) == n_before  # no second copy of the weights
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert before.std() > 0.5  # logits spread: a wrong split would not pass the comparison above


def test_lora_wrapped_projections_are_left_unfused():
    from pixtral.engine.fusion import fuse
    from pixtral.model.decoder import Attention
    from pixtral.model.layers import FeedForward
    from pixtral.train.lora import LoRALinear, apply_lora

    model, ids, images = model_and_prompt()
    apply_lora(model, rank=2, alpha=4.0, targets=["wq", "w1"])
    with torch.no_grad():
        before = model(ids, images)
        fuse(model, kernels=False)
        after = model(ids, images)
    layer = model.layers[0]
    assert type(layer.attention) is Attention and type(layer.feed_forward) is FeedForward
    assert isinstance(layer.attention.wq, LoRALinear)
    torch.testing.assert_close(after, before)


def test_the_engine_fuses_only_on_the_gpu():
    from pixtral.engine import Engine, EngineConfig
    from pixtral.model.decoder import Attention

    model, _, _ = model_and_prompt()

    class NoProcessor:
        eos_id, image_token_ids = 2, None

    Engine(model, NoProcessor(), EngineConfig(num_blocks=8))
    assert all(type(layer.attention) is Attention for layer in model.layers)  # the CPU keeps the model as it is
