"""Turns a scheduled step into one forward pass of the model, and images into features.

The flat batch: the token ids of every chunk back to back, their embeddings with image
features put in the prompt's [IMG] slots, an attention context over the paged cache, and
logits for the last token of each chunk that reaches its sequence's end. Attention batches the
decode rows and the prompt chunks of every request (`PagedAttention`), so a step costs about
the same whether its rows are decodes, prompt chunks or both. Steps made only of decodes skip
the image work, and on the GPU replay a CUDA graph.

A step is prepared (`prepare`: the chunks as plain data, a `StepInput`) and then executed
(`execute`); under tensor parallelism the driver sends the prepared step to every worker, and
every rank executes it (`executor.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from pixtral.engine import triton_decode, triton_prefill
from pixtral.engine.attention import PagedAttention
from pixtral.engine.chunk import Chunk
from pixtral.engine.config import EngineConfig
from pixtral.engine.kv_cache import PagedKVCache

log = logging.getLogger("pixtral.engine")


@dataclass
class StepInput:
    """One forward pass as plain data: what every tensor-parallel rank runs (`ModelRunner.execute`).

    `chunks` give the positions and block tables (their requests are not needed past `prepare`;
    a tensor-parallel driver sends its workers the tables' new blocks only); `token_ids` are the
    flat batch's tokens. A step of
    prompt tokens also has `slots` (where image features go) and `image_rows`, the feature rows
    that fill them in order, as (image key, first row, end row); `sample_rows` are the rows of the
    flat batch whose logits are returned, then `prompt_rows` (the prompt logprobs some requests ask
    for). A decode-only step has none of these (no image slot, every row samples). `block_copies`
    (source, destination) are KV blocks to copy before the step runs (a request's choices forking
    off its prompt's last, partly filled block).
    """

    chunks: list[Chunk]
    token_ids: np.ndarray | list[int]
    decode_only: bool
    slots: np.ndarray | None = None
    image_rows: list[tuple[bytes, int, int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, config: EngineConfig, max_model_len: int):
        self.model, self.cache, self.config = model, cache, config
        self.device = model.device
        self.graphs = None
        self._copies: list[tuple[int, int]] = []  # KV blocks to copy before the next step (`copy_blocks`)
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

    # ------------------------------------------------------------------ decode graphs
    def graph_plan(self) -> tuple | None:
        """What decides which decode steps replay a graph and at which padded shape (None: no graphs).

        Under tensor parallelism every rank must decide alike: a replayed step runs the collectives
        of its padded batch, an eager one those of the real batch, and ranks that differ would wait
        on each other's collectives. The driver compares every rank's plan before the first step.
        """
        g = self.graphs
        return None if g is None else (tuple(g.batch_sizes), g.max_blocks, g.use_triton, g.max_gather_tokens)

    def capture_graphs(self) -> None:
        """Capture the decode graphs now (engine start), so that no request waits for a capture."""
        if self.graphs is not None:
            self.graphs.capture_all()

    def release_graphs(self) -> None:
        """Drop the captured graphs and their memory pool (before a process group that they captured
        collectives of is destroyed: NCCL cannot tear a communicator down under live graphs)."""
        if self.graphs is not None:
            self.graphs = None
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ images
    def encode_images(self, images: list[torch.Tensor], keys: list[bytes] | None = None) -> list[torch.Tensor]:
        """Images of any number of requests, in one packed vision pass -> features per image.

        `keys` (the images' content hashes) are for a tensor-parallel runner, whose workers keep
        the features under them; this one does not need them."""
        counts = self.model.image_token_counts(images)
        parts = self.model.encode_images(images).split(counts)
        # Copies, when several: the encoder cache keeps each image's features, and a view would keep
        # the whole packed pass alive (and uncounted by the cache's budget).
        return [p.clone() for p in parts] if len(parts) > 1 else list(parts)

    # ------------------------------------------------------------------ decoder
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV blocks (source, destination) before the next step runs (on every rank: they go with it)."""
        self._copies += pairs

    def forward(self, chunks: list[Chunk], features: dict[bytes, torch.Tensor]) -> torch.Tensor:
        """Run the step; return float32 logits [number of sampling chunks + prompt-logprob rows, vocab]:
        first one row per sampling chunk, in chunk order, then each chunk's `prompt_logit_positions`."""
        return self.execute(self.prepare(chunks), features)

    def prepare(self, chunks: list[Chunk]) -> StepInput:
        """The step as plain data (what a tensor-parallel driver sends its workers)."""
        copies, self._copies = self._copies, []
        decode_only = all(c.length == 1 and c.samples and c.start >= c.request.prompt_len for c in chunks)
        if decode_only:
            return StepInput(chunks, [c.request.token_ids[c.start] for c in chunks], True, block_copies=copies)
        ids = np.concatenate([np.asarray(c.request.token_ids[c.start: c.end], dtype=np.int64) for c in chunks])
        slots, rows = self._image_rows(chunks)
        starts = np.cumsum([0] + [c.length for c in chunks])
        sample_rows = [int(starts[i + 1]) - 1 for i, c in enumerate(chunks) if c.samples]
        prompt_rows = [int(starts[i]) + p - c.start for i, c in enumerate(chunks) for p in c.prompt_logit_positions]
        return StepInput(chunks, ids, False, slots, rows, sample_rows, prompt_rows, copies)

    def execute(self, step: StepInput, features: Mapping[bytes, torch.Tensor]) -> torch.Tensor:
        """Run a prepared step: `features` holds the features of every image key it names."""
        chunks = step.chunks
        for src, dst in step.block_copies:
            self.cache.k[:, dst] = self.cache.k[:, src]
            self.cache.v[:, dst] = self.cache.v[:, src]
        if step.decode_only:
            longest = max(c.start + 1 for c in chunks)  # context of the longest row, this token included
            if self.graphs is not None and self.graphs.fits(len(chunks), longest):
                return self.graphs.run(step.token_ids, chunks)
            return self._decode(step)
        rows = torch.cat([features[key][a:b] for key, a, b in step.image_rows]) if step.image_rows else None
        slots = torch.from_numpy(step.slots).to(self.device)
        h = self.model.embed(torch.from_numpy(step.token_ids).to(self.device), rows, slots)
        ctx = PagedAttention(self.cache, chunks, self.device, kernel=self.varlen_kernel)
        hidden = self.model.hidden_states(h, ctx)
        rows = torch.tensor(step.sample_rows + step.prompt_rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden[rows])

    @staticmethod
    def _image_rows(chunks: list[Chunk]) -> tuple[np.ndarray, list[tuple[bytes, int, int]]]:
        """The flat batch's image slots and, in order, the feature rows that fill them: (image key,
        first row, end row) of that image's features.

        Only prompt slots take features (a generated [IMG] token keeps its plain embedding), and a
        chunk that cuts an image takes that image's rows for its part of the slots.
        """
        rows, masks = [], []
        for c in chunks:
            req, end = c.request, c.end
            masks.append(req.image_slot_mask(c.start, end))
            r0, r1 = req.image_rows(c.start, end)
            for k in req.images_for_rows(r0, r1):
                first, last = int(req.image_row_starts[k]), int(req.image_row_starts[k + 1])
                rows.append((req.image_hashes[k], max(r0, first) - first, min(r1, last) - first))
        return np.concatenate(masks), rows

    def _decode(self, step: StepInput) -> torch.Tensor:
        """A step of decodes only (no prompt token, so no image slot, and every chunk samples)."""
        ids = torch.tensor(step.token_ids, dtype=torch.long, device=self.device)
        ctx = PagedAttention(self.cache, step.chunks, self.device, kernel=self.varlen_kernel)
        return self.model.logits(self.model.hidden_states(self.model.tok_embeddings(ids), ctx))
