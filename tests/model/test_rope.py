"""RoPE facts (docs/architecture.md), checked against direct formulas."""

import math

import torch

from pixtral.model.rope import angles_1d, angles_2d, apply_rotary, rotations


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


def test_rotation_turns_adjacent_pairs():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 8)
    angles = torch.randn(4, 4)
    got = apply_rotary(x, rotations(angles))
    c, s = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]  # pairs (2p, 2p+1), the Mistral convention
    expected = torch.empty_like(x)
    expected[..., 0::2], expected[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
    assert torch.allclose(got, expected, atol=1e-6)
    # a quarter turn of pair p maps (a, b) to (-b, a)
    quarter = torch.zeros(4, 4)
    quarter[:, 1] = math.pi / 2
    turned = apply_rotary(x, rotations(quarter))
    assert torch.allclose(turned[..., 2], -x[..., 3], atol=1e-6) and torch.allclose(turned[..., 3], x[..., 2], atol=1e-6)
    assert torch.equal(turned[..., :2], x[..., :2])


def test_rotation_in_float32_for_bf16_inputs():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8).bfloat16()
    rotation = rotations(torch.randn(3, 4) * 100)
    out = apply_rotary(x, rotation)
    assert out.dtype == torch.bfloat16
    # rotated in float32, rounded once at the end
    assert torch.equal(out, apply_rotary(x.float(), rotation).bfloat16())
    assert not torch.equal(out, x)
