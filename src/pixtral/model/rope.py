"""Rotary position embeddings, Mistral convention: rotation pairs are adjacent dims (2p, 2p+1).

Weights in the Hugging Face layout use the `rotate_half` convention instead; the checkpoint
loader permutes their q/k rows back, so the model only ever sees the Mistral convention.
Angles and the rotation are computed in float32 whatever the activation dtype, as the
reference does.
"""

from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """f[k] = theta^(-2k/d) for k < d/2, in float32."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)[: head_dim // 2] / head_dim
    return 1.0 / (theta**exponents)


def angles_1d(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """[T] integer positions -> [T, head_dim/2] rotation angles."""
    freqs = inv_frequencies(head_dim, theta, positions.device)
    return positions.to(torch.float32)[:, None] * freqs[None, :]


def angles_2d(height: int, width: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Angles for an image of height x width patches, row-major: [h*w, head_dim/2].

    Height takes the even-indexed base frequencies and fills the first half of the pairs;
    width takes the odd-indexed ones and fills the second half (block layout, as the released
    weights were trained). Positions restart at (0, 0) for every image.
    """
    freqs = inv_frequencies(head_dim, theta, device)
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    row_angles = rows[:, None] * freqs[None, 0::2]  # [h, d/4]
    col_angles = cols[:, None] * freqs[None, 1::2]  # [w, d/4]
    grid = torch.cat(
        (
            row_angles[:, None, :].expand(height, width, -1),
            col_angles[None, :, :].expand(height, width, -1),
        ),
        dim=-1,
    )
    return grid.reshape(height * width, -1)


def rotations(angles: torch.Tensor) -> torch.Tensor:
    """Angles [T, d/2] -> unit complex numbers e^(i*angle), complex64: what `apply_rotary` multiplies by."""
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, d] by per-token rotations [T, d/2] (complex, see `rotations`).

    Each adjacent pair (2p, 2p+1) is read as one complex number and multiplied by its
    rotation: one fused complex product instead of a dozen real-valued ops per call, which
    matters when a decode step is mostly kernel-call overhead.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[:, None, :]).flatten(-2).type_as(x)
