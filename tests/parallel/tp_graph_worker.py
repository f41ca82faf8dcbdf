"""One rank of tests/parallel/test_tp_graph_decoder.py: greedy decoding through the CUDA-graph decoder
(`engine.cuda_graphs.CudaGraphDecoder`) on a tensor-parallel model, with its captures replaced by
eager runs (no CUDA here): padded batch buckets, static buffers and the null block, with the
collectives of the padded batch on every rank. Saves the logits of each step to OUT/rank{r}.pt.

usage: python tp_graph_worker.py JOB.pt OUT_DIR   (JOB.pt: {"checkpoint": path})
"""

from __future__ import annotations

import torch

from pixtral.engine.attention import PagedAttention
from pixtral.engine.chunk import Chunk
from pixtral.engine.kv_cache import PagedKVCache

from tests.parallel.ranks import serve_as_rank  # run_ranks puts the repository on the path

BLOCK = 16
PROMPTS = [7, 20, 33, 3, 50]  # prompt lengths: block tables of 1 to 4 blocks
STEPS = 4  # decode steps of all five sequences, then STEPS of the first three (a smaller bucket)


def decode_run(model, graphs: bool) -> dict:
    """Prefill the five prompts, then greedy decode steps: with the graph decoder (its captures run
    eagerly) or with the engine's eager decode attention. -> {"logits": [...], "captured": [...]}"""
    g = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    prompts = [torch.randint(11, vocab, (n,), generator=g) for n in PROMPTS]  # above the special ids
    cache = PagedKVCache(model.args, 40, BLOCK, torch.device("cpu"), torch.float32)
    cache.k.zero_()  # as on the GPU: the graphs' padded rows read (masked) slots of the null block
    cache.v.zero_()
    tables, first = [], 1  # block 0 is the null block
    for n in PROMPTS:
        count = -(-(n + 2 * STEPS) // BLOCK)
        tables.append(list(range(first, first + count)))
        first += count
    out = {"logits": [], "captured": []}
    with torch.inference_mode():
        chunks = [Chunk(0, n, t) for n, t in zip(PROMPTS, tables)]
        hidden = model.hidden_states(model.tok_embeddings(torch.cat(prompts)), PagedAttention(cache, chunks, cache.k.device))
        ends = torch.tensor(PROMPTS).cumsum(0) - 1
        next_ids = model.logits(hidden[ends]).argmax(-1).tolist()
        lengths = list(PROMPTS)
        decoder = None
        if graphs:
            from pixtral.engine.cuda_graphs import CudaGraphDecoder

            decoder = CudaGraphDecoder(model, cache, max_batch=8, max_model_len=256, max_gather_tokens=2**12)

            def capture(batch, width):  # a "graph" that replays the step eagerly
                out["captured"].append((batch, width))
                step = decoder.graphs[(batch, width)] = type("EagerGraph", (), {})()
                step.replay = lambda: decoder._forward(batch, width)
                return step

            decoder._capture = capture
        for rows in [5] * STEPS + [3] * STEPS:
            chunks = [Chunk(lengths[i], 1, tables[i]) for i in range(rows)]
            ids = next_ids[:rows]
            if decoder is not None:
                assert decoder.fits(rows, max(c.end for c in chunks))
                logits = decoder.run(ids, chunks).clone()
            else:
                ctx = PagedAttention(cache, chunks, cache.k.device)
                logits = model.logits(model.hidden_states(model.tok_embeddings(torch.tensor(ids)), ctx))
            out["logits"].append(logits)
            next_ids[:rows] = logits.argmax(-1).tolist()
            for i in range(rows):
                lengths[i] += 1
    return out


def work(job: dict, rank: int, size: int):
    from pixtral.parallel import load_tp_model

    model = load_tp_model(job["checkpoint"], dtype=torch.float32)
    return decode_run(model, graphs=True)


if __name__ == "__main__":
    serve_as_rank(work)
