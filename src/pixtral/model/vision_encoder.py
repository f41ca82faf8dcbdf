"""PixtralViT: natural-resolution vision encoder with RoPE-2D and per-image attention.

Module names follow the Mistral checkpoint keys (`vision_encoder.transformer.layers.N...`).
"""

from __future__ import annotations

import torch
from torch import nn

from pixtral.model.args import VisionArgs
from pixtral.model.attention import block_attention
from pixtral.model.layers import FeedForward, RMSNorm
from pixtral.model.rope import angles_2d, apply_rotary, rotations


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.num_attention_heads, args.head_dim
        dim = args.hidden_size
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    rotary = staticmethod(apply_rotary)

    def forward(self, x, rotation, seqlens: list[int]):
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.wk(x).unflatten(-1, (self.n_heads, self.head_dim))
        v = self.wv(x).unflatten(-1, (self.n_heads, self.head_dim))
        q, k = self.rotary(q, rotation), self.rotary(k, rotation)
        return self.wo(block_attention(q, k, v, seqlens).flatten(1))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.attention = VisionAttention(args)
        self.attention_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.feed_forward = FeedForward(args.hidden_size, args.intermediate_size)
        self.ffn_norm = RMSNorm(args.hidden_size, args.norm_eps)

    def forward(self, x, rotation, seqlens):
        h = x + self.attention(self.attention_norm(x), rotation, seqlens)
        return h + self.feed_forward(self.ffn_norm(h))


class VisionLayers(nn.Module):
    # Exists only so parameter names read `transformer.layers.N`, as in the checkpoints.
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(args) for _ in range(args.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_conv = nn.Conv2d(args.num_channels, args.hidden_size, args.patch_size, args.patch_size, bias=False)
        self.ln_pre = RMSNorm(args.hidden_size, args.norm_eps)
        self.transformer = VisionLayers(args)

    def grid(self, image: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of patches for one image, checked against the model's limits."""
        a = self.args
        if image.dim() != 3 or image.shape[0] != a.num_channels:
            raise ValueError(f"an image must be a [{a.num_channels}, H, W] tensor, got shape {tuple(image.shape)}")
        _, height, width = image.shape
        if height % a.patch_size or width % a.patch_size or height == 0 or width == 0:
            raise ValueError(f"image size {height}x{width} is not a positive multiple of the patch size {a.patch_size}")
        h, w = height // a.patch_size, width // a.patch_size
        if max(h, w) > a.max_patches_per_side:
            raise ValueError(
                f"image of {height}x{width} px has {h}x{w} patches, over the model's limit of "
                f"{a.max_patches_per_side} per side (image_size {a.image_size})"
            )
        return h, w

    def patchify(self, images: list[torch.Tensor]) -> torch.Tensor:
        """All patches of all images, row-major per image, as one GEMM with the conv weight."""
        p, c = self.args.patch_size, self.args.num_channels
        dtype = self.patch_conv.weight.dtype
        flat = []
        for image in images:
            _, height, width = image.shape
            patches = image.to(dtype).reshape(c, height // p, p, width // p, p).permute(1, 3, 0, 2, 4)
            flat.append(patches.reshape(-1, c * p * p))
        weight = self.patch_conv.weight.reshape(self.args.hidden_size, -1)
        return torch.cat(flat) @ weight.t()

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """images: list of [C, H, W] -> (features [sum h*w, hidden], per-image (h, w))."""
        grids = [self.grid(image) for image in images]
        x = self.ln_pre(self.patchify(images))
        angles = torch.cat(
            [angles_2d(h, w, self.args.head_dim, self.args.rope_theta, device=x.device) for h, w in grids]
        )
        rotation = rotations(angles)
        seqlens = [h * w for h, w in grids]
        for layer in self.transformer.layers:
            x = layer(x, rotation, seqlens)
        return x, grids
