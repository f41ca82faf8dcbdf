"""RoPE facts from the spec, checked against direct formulas."""

import math

import torch

from pixtral.model.rope import angles_1d, angles_2d, apply_rotary


def test_angles_2d_block_layout():
    d, theta = 64, 10000.0
    f = [theta ** (-2 * k / d) for k in range(d // 2)]
    angles = angles_2d(3, 5, d, theta)
    assert angles.shape == (15, 32)
    for i in range(3):
        for j in range(5):
            row = angles[i * 5 + j]  # row-major token order
            expected = [i * f[2 * k] for k in range(16)] + [j * f[2 * k + 1] for k in range(16)]
            assert torch.allclose(row, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_angles_1d():
    a = angles_1d(torch.tensor([0, 7, 131071]), 128, 1e9)
    assert a.shape == (3, 64)
    assert a[0].abs().max() == 0
    assert math.isclose(a[2, 1].item(), 131071 * 1e9 ** (-2 / 128), rel_tol=1e-6)


def test_rotation_is_complex_multiplication_on_adjacent_pairs():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 8)
    angles = torch.randn(4, 4)
    got = apply_rotary(x, torch.cos(angles), torch.sin(angles))
    z = torch.view_as_complex(x.reshape(4, 2, 4, 2).contiguous())
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None, :]).reshape(4, 2, 8)
    assert torch.allclose(got, expected, atol=1e-6)


def test_rotation_in_float32_for_bf16_inputs():
    x = torch.randn(3, 1, 4).bfloat16()
    out = apply_rotary(x, torch.ones(3, 2), torch.zeros(3, 2))
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)
