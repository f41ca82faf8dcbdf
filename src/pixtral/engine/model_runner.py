"""Turns a scheduled step into one forward pass of the model, and images into features.

The flat batch: the token ids of every chunk back to back, their embeddings with image
features put in the prompt's [IMG] slots, an attention context over the paged cache, and
logits for the last token of each chunk that reaches its sequence's end. Attention batches the
decode rows and the prompt chunks of every request (`PagedAttention`), so a step costs about
the same whether its rows are decodes, prompt chunks or both. Steps made only of decodes skip
the image work, and on the GPU replay a CUDA graph.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pixtral.engine import triton_decode, triton_prefill
from pixtral.engine.attention import PagedAttention
from pixtral.engine.chunk import Chunk
from pixtral.engine.config import EngineConfig
from pixtral.engine.kv_cache import PagedKVCache

log = logging.getLogger("pixtral.engine")


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, config: EngineConfig, max_model_len: int):
        self.model, self.cache, self.config = model, cache, config
        self.device = model.device
        self.graphs = None
        on_gpu = self.device.type == "cuda"
        self.varlen_kernel = config.triton_kernels and on_gpu and triton_decode.available(self.device)
        if self.varlen_kernel:  # a kernel that fails to compile or to agree here leaves the SDPA calls in charge
            problem = triton_prefill.self_check(self.device, cache.k.dtype, model.args.n_heads, cache.n_kv_heads,
                                                cache.head_dim, cache.block_size)
            if problem:
                log.warning("Triton mixed-step attention disabled: %s", problem)
                self.varlen_kernel = False
        if config.cuda_graphs and self.device.type == "cuda":
            from pixtral.engine.cuda_graphs import CudaGraphDecoder

            self.graphs = CudaGraphDecoder(model, cache, min(config.max_graph_batch, config.max_num_seqs),
                                           max_model_len, use_triton=config.triton_kernels)

    # ------------------------------------------------------------------ images
    def encode_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Images of any number of requests, in one packed vision pass -> features per image."""
        counts = self.model.image_token_counts(images)
        parts = self.model.encode_images(images).split(counts)
        # Copies, when several: the encoder cache keeps each image's features, and a view would keep
        # the whole packed pass alive (and uncounted by the cache's budget).
        return [p.clone() for p in parts] if len(parts) > 1 else list(parts)

    # ------------------------------------------------------------------ decoder
    def forward(self, chunks: list[Chunk], features: dict[bytes, torch.Tensor]) -> torch.Tensor:
        """Run the step; return float32 logits [number of sampling chunks, vocab], in chunk order."""
        decode_only = all(c.length == 1 and c.samples and c.start >= c.request.prompt_len for c in chunks)
        if decode_only:
            longest = max(c.start + 1 for c in chunks)  # context of the longest row, this token included
            if self.graphs is not None and self.graphs.fits(len(chunks), longest):
                return self._decode_with_graph(chunks)
            return self._decode(chunks)
        ids = np.concatenate([np.asarray(c.request.token_ids[c.start: c.end], dtype=np.int64) for c in chunks])
        slots, rows = self._image_rows(chunks, features)
        h = self.model.embed(torch.from_numpy(ids).to(self.device), rows, slots)
        ctx = PagedAttention(self.cache, chunks, self.device, kernel=self.varlen_kernel)
        hidden = self.model.hidden_states(h, ctx)
        ends = np.cumsum([c.length for c in chunks]) - 1
        rows = [int(e) for c, e in zip(chunks, ends) if c.samples]
        return self.model.logits(hidden[torch.tensor(rows, dtype=torch.long, device=self.device)])

    def _image_rows(self, chunks: list[Chunk], features: dict[bytes, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flat batch's image slots and, in order, the feature rows that fill them.

        Only prompt slots take features (a generated [IMG] token keeps its plain embedding), and a
        chunk that cuts an image takes that image's rows for its part of the slots.
        """
        rows, masks = [], []
        for c in chunks:
            req, end = c.request, c.end
            masks.append(req.image_slot_mask(c.start, end))
            r0, r1 = req.image_rows(c.start, end)
            for k in req.images_for_rows(r0, r1):
                first = int(req.image_row_starts[k])
                feats = features[req.image_hashes[k]]
                rows.append(feats[max(r0, first) - first: min(r1, first + feats.shape[0]) - first])
        slots = torch.from_numpy(np.concatenate(masks)).to(self.device)
        return slots, (torch.cat(rows) if rows else None)

    def _decode(self, chunks: list[Chunk]) -> torch.Tensor:
        """A step of decodes only (no prompt token, so no image slot, and every chunk samples)."""
        ids = torch.tensor([c.request.token_ids[c.start] for c in chunks], dtype=torch.long, device=self.device)
        ctx = PagedAttention(self.cache, chunks, self.device, kernel=self.varlen_kernel)
        return self.model.logits(self.model.hidden_states(self.model.tok_embeddings(ids), ctx))

    def _decode_with_graph(self, chunks: list[Chunk]) -> torch.Tensor:
        return self.graphs.run([c.request.token_ids[c.start] for c in chunks], chunks)
