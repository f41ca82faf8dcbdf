"""Pixtral: vision encoder + adapter + Mistral decoder, with the Mistral checkpoint's names.

`model(input_ids, images)` runs one sequence and returns float32 logits. Engines and trainers
use the pieces: `encode_images`, `embed`, `hidden_states` (under any attention context) and
`logits`.
"""

from __future__ import annotations

import torch
from torch import nn

from pixtral.model.adapter import PatchMerger, VisionLanguageAdapter
from pixtral.model.args import ModelArgs
from pixtral.model.attention import AttentionContext, PackedCausal
from pixtral.model.decoder import TransformerBlock
from pixtral.model.layers import RMSNorm
from pixtral.model.rope import angles_1d, rotations
from pixtral.model.vision_encoder import VisionTransformer


class Pixtral(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # untied from tok_embeddings
        v = args.vision
        if v is not None:
            self.vision_encoder = VisionTransformer(v)
            if v.add_pre_mm_projector_layer_norm:
                self.pre_mm_projector_norm = RMSNorm(v.hidden_size, v.norm_eps)
            if v.uses_patch_merger:
                self.patch_merger = PatchMerger(v.hidden_size, v.spatial_merge_size)
            self.vision_language_adapter = VisionLanguageAdapter(v.hidden_size, args.dim, bias=v.adapter_bias)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    # ------------------------------------------------------------------ images
    @property
    def image_token_id(self) -> int | None:
        return self.args.vision.image_token_id if self.args.vision else None

    def encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """All images, packed in one pass -> [sum of image tokens, dim] in decoder width."""
        if self.args.vision is None:
            raise ValueError("this model has no vision encoder, but images were given")
        features, grids = self.vision_encoder([img.to(self.device) for img in images])
        if self.args.vision.add_pre_mm_projector_layer_norm:
            features = self.pre_mm_projector_norm(features)
        if self.args.vision.uses_patch_merger:
            features = self.patch_merger(features, grids)
        return self.vision_language_adapter(features)

    def image_token_counts(self, images: list[torch.Tensor]) -> list[int]:
        """How many [IMG] tokens each image fills (without running the encoder)."""
        s = self.args.vision.spatial_merge_size
        return [(h // s) * (w // s) for h, w in (self.vision_encoder.grid(img) for img in images)]

    # ------------------------------------------------------------------ decoder
    def image_slots(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[L] bool: where image features go (the [IMG] tokens)."""
        if self.image_token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.image_token_id

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None,
              slots: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image slots replaced, in order, by image features.

        `slots` defaults to every [IMG] token; the engine passes its own (a prompt chunk's slots
        only: an [IMG] token the model generated keeps its plain embedding).
        """
        h = self.tok_embeddings(input_ids)
        slots = self.image_slots(input_ids) if slots is None else slots
        n_slots = int(slots.sum())
        n_features = 0 if image_features is None else image_features.shape[0]
        if n_slots != n_features:
            raise ValueError(
                f"the prompt has {n_slots} [IMG] tokens but the images give {n_features} image tokens; "
                "encode prompts and images together with the processor"
            )
        if n_features:
            h = h.masked_scatter(slots[:, None], image_features.to(h.dtype))
        return h

    def hidden_states(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Run the decoder blocks over embeddings [T, dim]; returns final-normed states."""
        rotation = rotations(angles_1d(ctx.positions, self.args.head_dim, self.args.rope_theta))
        for i, layer in enumerate(self.layers):
            h = layer(h, rotation, ctx, i)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden).float()

    def forward(self, input_ids: torch.Tensor, images: list[torch.Tensor] | None = None,
                ctx: AttentionContext | None = None) -> torch.Tensor:
        """input_ids [L], images list of [3, H, W] -> logits float32 [L, vocab]."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D [L], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        input_ids = input_ids.to(self.device)
        features = self.encode_images(images) if images else None
        h = self.embed(input_ids, features)
        ctx = ctx if ctx is not None else PackedCausal([input_ids.numel()], device=self.device)
        return self.logits(self.hidden_states(h, ctx))
