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
    from pixtral.model import fused_ops

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
    from pixtral.model import fused_ops
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
    from pixtral.model import fused_ops

    torch.manual_seed(0)
    gate_up = torch.randn(6, 2 * 80).mul(4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    out = fused_ops.silu_mul(gate_up)
    assert out.shape == (6, 80)
    close(out, F.silu(gate) * up, dtype)


def test_tensors_that_need_gradients_take_the_eager_path(request):
    if not INTERPRETED:
        return rerun_interpreted(request.node.name)
    from pixtral.model import fused_ops

    x = torch.randn(4, 32, requires_grad=True)
    weight = torch.ones(32, requires_grad=True)
    out = fused_ops.rms_norm(x, weight, 1e-5)
    out.sum().backward()  # the kernels have no backward: training must not reach them
    assert x.grad is not None and torch.equal(out, fused_ops.rms_norm_eager(x, weight, 1e-5))


def test_whole_model_with_fused_kernels_gives_the_same_logits(request, monkeypatch):
    if not INTERPRETED:
        return rerun_interpreted(request.node.name)
    from pixtral.model import fused_ops

    model = random_model("tiny")
    images = [torch.randn(3, 32, 48), torch.randn(3, 16, 16)]
    slots = [model.image_token_id] * sum(model.image_token_counts(images))
    ids = torch.tensor([1] + slots + torch.randint(1000, 5000, (12,)).tolist())
    with torch.no_grad():
        eager = model(ids, images)
        model.fuse_projections().use_fused_kernels()

        def refuse(*args):
            raise AssertionError("an eager fallback ran: every norm and rotation must take its kernel")

        monkeypatch.setattr(fused_ops, "rms_norm_eager", refuse)
        monkeypatch.setattr(fused_ops, "rotary_eager", refuse)
        fused = model(ids, images)
    assert model.layers[0].ffn_norm.fused and model.vision_encoder.transformer.layers[0].attention.fused
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)  # float32 summation order only
    assert eager.std() > 0.5


def test_engine_keeps_the_kernels_only_when_they_agree_with_the_eager_code(request, monkeypatch):
    if not INTERPRETED:
        return rerun_interpreted(request.node.name)
    from pixtral.engine.engine import enable_fused_kernels
    from pixtral.model import fused_ops

    model = random_model("tiny")
    assert enable_fused_kernels(model) and model.layers[0].attention.fused
    # A kernel that computes something else: the check catches it and the model stays eager.
    monkeypatch.setattr(fused_ops, "rotary", lambda x, rotation: x)
    assert not enable_fused_kernels(model)
    assert not any(getattr(m, "fused", False) for m in model.modules())
    # A kernel that fails (say, does not compile on this GPU): the same.
    monkeypatch.setattr(fused_ops, "rotary", lambda x, rotation: 1 / 0)
    assert not enable_fused_kernels(model)
    assert not model.layers[0].attention.fused
