"""From vision features to decoder embeddings: optional pre-norm, 2x2 patch merger, adapter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VisionLanguageAdapter(nn.Module):
    """w_out(gelu(w_in(x))) with exact (erf) GELU, applied to every image token."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.w_in = nn.Linear(in_dim, out_dim, bias=bias)
        self.w_out = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


class PatchMerger(nn.Module):
    """Merge each s x s block of patches into one token (Mistral-Small-3.1, s = 2).

    Within a block the features are ordered channel-major (c * s*s + ki * s + kj), exactly
    what `F.unfold` produces, then projected back to the vision width.
    """

    def __init__(self, dim: int, merge: int):
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(dim * merge * merge, dim, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        s, out = self.merge, []
        for tokens, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            if h % s or w % s:
                raise ValueError(f"a {h}x{w} patch grid cannot be merged in {s}x{s} blocks")
            grid = tokens.reshape(h, w, -1).permute(2, 0, 1).unsqueeze(0)  # [1, C, h, w]
            blocks = F.unfold(grid, kernel_size=s, stride=s)  # [1, C*s*s, (h/s)*(w/s)]
            out.append(blocks[0].t())
        return self.merging_layer(torch.cat(out))
