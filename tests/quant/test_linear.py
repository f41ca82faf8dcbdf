"""Int8WeightLinear and Fp8Linear on the CPU against dequantized float references, and RowParallel around them."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pixtral.parallel.tensor_parallel import RowParallel
from pixtral.quant import FP8_DTYPE, FP8_MAX, Fp8Linear, Int8WeightLinear, quantize_fp8_per_token
from pixtral.quant.linear import _INT8_KERNEL


def linear(in_features=64, out_features=48, bias=False, seed=0, zero_rows=()) -> nn.Linear:
    torch.manual_seed(seed)
    m = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        m.weight.mul_(torch.logspace(-3, 1, out_features)[:, None])  # rows of very different ranges
        for r in zero_rows:
            m.weight[r] = 0
    return m.requires_grad_(False)


# ---------------------------------------------------------------- quantization error
@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_error_within_half_a_step(per_channel):
    lin = linear(zero_rows=(3,))
    q = Int8WeightLinear.from_linear(lin, per_channel=per_channel)
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert q.weight_scale.shape == ((48,) if per_channel else ())
    assert q.weight.abs().max() <= 127
    w = lin.weight
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
    err = (q.dequantized_weight() - w).abs()
    assert (err <= amax / 254 * (1 + 1e-6) + 1e-12).all()  # round-to-nearest: half a step of absmax/127
    assert torch.equal(q.dequantized_weight()[3], torch.zeros(64))


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_error_within_e4m3_rounding(per_channel):
    lin = linear(zero_rows=(5,))
    q = Fp8Linear.from_linear(lin, per_channel=per_channel)
    assert q.weight.dtype == FP8_DTYPE
    assert q.weight.float().abs().max() <= FP8_MAX
    w = lin.weight
    scale = q.weight_scale.reshape(-1, 1)
    err = (q.dequantized_weight() - w).abs()
    # e4m3: 3 mantissa bits, half an ulp = 2^-4 relative for normals; subnormals (< 2^-6) step 2^-9
    bound = torch.maximum(w.abs() / 16, scale * 2.0 ** -10)
    assert (err <= bound * (1 + 1e-6)).all()
    if per_channel:  # every row's absmax maps to 448 exactly, so it comes back exactly
        assert torch.allclose(q.dequantized_weight().abs().amax(1)[w.abs().amax(1) > 0],
                              w.abs().amax(1)[w.abs().amax(1) > 0], rtol=1e-6, atol=0)
    assert torch.equal(q.dequantized_weight()[5], torch.zeros(64))


def test_per_channel_beats_per_tensor_on_uneven_rows():
    lin = linear()
    for cls in (Int8WeightLinear, Fp8Linear):
        errs = [(cls.from_linear(lin, per_channel=pc).dequantized_weight() - lin.weight).abs()[:8].max()
                for pc in (True, False)]
        assert errs[0] < errs[1], cls.__name__  # small rows lose most under one scale


def test_fp8_per_token_activation_quantization():
    x = torch.randn(7, 32) * torch.logspace(-2, 2, 7)[:, None]
    x[2] = 0
    xq, s = quantize_fp8_per_token(x)
    assert xq.dtype == FP8_DTYPE and s.shape == (7, 1) and xq.is_contiguous()
    back = xq.float() * s
    assert (back - x).abs().le(torch.maximum(x.abs() / 16, s * 2.0 ** -10) * (1 + 1e-6)).all()
    assert torch.equal(back[2], torch.zeros(32))


# ---------------------------------------------------------------- forward
def test_int8_kernel_signature_on_this_torch():
    """What the int8 path relies on: 2-D x, int8 [N, K] weight, scales in x's dtype."""
    assert _INT8_KERNEL is not None
    x, w, s = torch.randn(3, 32), torch.randint(-127, 128, (16, 32), dtype=torch.int8), torch.rand(16)
    torch.testing.assert_close(_INT8_KERNEL(x, w, s), x @ (w.float() * s[:, None]).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):
        _INT8_KERNEL(x, w, s.bfloat16())  # scales must match x's dtype: the layer casts them


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_forward_matches_dequantized_reference(per_channel, bias):
    lin = linear(bias=bias)
    q = Int8WeightLinear.from_linear(lin, per_channel=per_channel)
    x = torch.randn(2, 5, 64)
    ref = F.linear(x.double(), q.dequantized_weight(torch.float64), None if q.bias is None else q.bias.double())
    assert q.uses_kernel(x)
    out = q(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)  # kernel: fp32 sums, other order
    # bfloat16 activations: the kernel with bf16 scales, bf16 output
    outb = q(x.bfloat16())
    assert outb.dtype == torch.bfloat16
    torch.testing.assert_close(outb.double(), ref, rtol=2e-2, atol=2e-2)
    # float64 (no kernel): the dequantize fallback, bit-equal to the explicit dequantized matmul
    assert not q.uses_kernel(x.double())
    assert torch.equal(q(x.double()), ref)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_many_rows_convert_the_weight_instead_of_the_kernel(monkeypatch, per_channel, dtype):
    """Past KERNEL_MAX_ROWS rows (a prompt chunk) the weight is converted for one matrix product,
    with the kernel's result up to rounding; up to it, the kernel runs."""
    import pixtral.quant.linear as quant_linear

    q = Int8WeightLinear.from_linear(linear(bias=True), per_channel=per_channel)
    limit = Int8WeightLinear.KERNEL_MAX_ROWS
    few, many = torch.randn(limit, 64, dtype=dtype), torch.randn(3, limit, 64, dtype=dtype)
    kernel_rows = []
    kernel = quant_linear._INT8_KERNEL
    monkeypatch.setattr(quant_linear, "_INT8_KERNEL", lambda x, w, s: kernel_rows.append(len(x)) or kernel(x, w, s))
    expected = q(many.reshape(-1, 64)[:limit]).double()  # the kernel, on the first `limit` rows
    assert kernel_rows == [limit]
    out = q(many)
    assert kernel_rows == [limit] and out.dtype == dtype and out.shape == (3, limit, 48)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.reshape(-1, 48)[:limit].double(), expected, rtol=tol, atol=tol)
    ref = F.linear(many.double(), q.dequantized_weight(torch.float64), q.bias.double())
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    q(few)
    assert kernel_rows == [limit, limit]


def test_int8_fallback_is_bit_exact(monkeypatch):
    q = Int8WeightLinear.from_linear(linear(bias=True))
    monkeypatch.setattr(Int8WeightLinear, "uses_kernel", lambda self, x: False)
    x = torch.randn(5, 64)
    assert torch.equal(q(x), F.linear(x, (q.weight.float() * q.weight_scale[:, None]), q.bias))


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cpu_forward_is_the_dequantized_matmul_bit_for_bit(per_channel, bias, dtype):
    lin = linear(bias=bias).to(dtype)
    q = Fp8Linear.from_linear(lin, per_channel=per_channel)
    x = torch.randn(3, 4, 64, dtype=dtype)
    assert not q.uses_scaled_mm(x)
    w = (q.weight.float() * q.weight_scale.float().reshape(-1, 1)).to(dtype)
    expected = F.linear(x, w) + (0 if q.bias is None else q.bias)
    assert torch.equal(q(x), expected)
    # and close to the float layer it came from (e4m3 weights: ~2^-4 relative per weight)
    ref = lin.float()(x.float())
    assert (q(x).float() - ref).abs().max() <= 0.1 * ref.abs().max()


def test_dtype_cast_keeps_quantized_weights():
    model = nn.Sequential(Int8WeightLinear.from_linear(linear(bias=True)), Fp8Linear.from_linear(linear(48, 16)))
    w0, s0 = model[0].weight.clone(), model[0].weight_scale.clone()
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.int8 and model[1].weight.dtype == FP8_DTYPE
    assert model[0].weight_scale.dtype == torch.float32 and torch.equal(model[0].weight_scale, s0)
    assert torch.equal(model[0].weight, w0) and model[0].bias.dtype == torch.bfloat16
    assert model(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert set(model.state_dict()) == {"0.weight", "0.weight_scale", "0.bias", "1.weight", "1.weight_scale"}


# ---------------------------------------------------------------- RowParallel around them
@pytest.fixture(scope="module")
def group_of_one():
    """A real gloo process group of world size 1 (the default group if none is up)."""
    if dist.is_initialized():
        yield dist.new_group([dist.get_rank()]) if dist.get_world_size() == 1 else pytest.skip("world > 1")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", [nn.Linear, Int8WeightLinear, Fp8Linear])
def test_row_parallel_wraps_any_linear_with_stable_names(group_of_one, cls):
    lin = linear(bias=True)
    inner = lin if cls is nn.Linear else cls.from_linear(lin)
    expected = inner(torch.ones(1, 64))  # reference before wrapping
    row = RowParallel(inner, group_of_one)
    assert (row.in_features, row.out_features) == (64, 48)
    names = {"weight", "bias"} | ({"weight_scale"} if cls is not nn.Linear else set())
    assert set(dict(row.named_parameters())) == names and set(row.state_dict()) == names
    assert row.weight is inner.weight
    x = torch.randn(4, 64)
    # the all-reduce of one rank is the identity: inner without bias, then + bias
    assert torch.equal(row(x), inner(x))
    assert torch.allclose(row(torch.ones(1, 64)), expected)
    # the loader's way of setting a parameter reaches the inner module
    row._parameters["bias"] = nn.Parameter(torch.zeros(48), requires_grad=False)
    assert torch.equal(inner.bias, torch.zeros(48))
    assert torch.equal(row(x), inner(x))


def test_row_parallel_set_inner_swaps_in_a_quantized_linear(group_of_one):
    lin = linear(bias=True)
    row = RowParallel(lin, group_of_one)
    q = Int8WeightLinear.from_linear(lin)
    row.set_inner(q)
    assert set(row.state_dict()) == {"weight", "weight_scale", "bias"} and row.weight.dtype == torch.int8
    x = torch.randn(3, 64)
    assert torch.equal(row(x), q(x))
    row.to(torch.bfloat16)  # through the inner: weights stay int8, bias follows
    assert row.weight.dtype == torch.int8 and row.bias.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
