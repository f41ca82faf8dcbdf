"""Pick the next token for every sequence of a batch, each with its own sampling parameters.

Greedy rows take the argmax. Rows with a seed use the reference sampler with their own
generator, on the CPU, so a seeded request gives the same tokens alone, in any batch, and in
`pixtral.generation`. Other rows are sampled together: temperature, top-k and top-p applied
per row in one pass, then one multinomial draw.
"""

from __future__ import annotations

import torch

from pixtral.engine.outputs import TokenLogprob
from pixtral.engine.request import Request
from pixtral.generation.sampling import sample, top_logprobs


def batched_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Rows of logits [B, V] -> probabilities, as `pixtral.generation.sampling.filtered_probs` per row."""
    logits = logits.float() / temperature[:, None]
    vocab = logits.shape[-1]
    use_k = (top_k > 0) & (top_k < vocab)
    use_p = top_p < 1.0
    if not bool(use_k.any() or use_p.any()):
        return torch.softmax(logits, dim=-1)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    if bool(use_k.any()):
        kth = sorted_logits.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])
        kth = torch.where(use_k[:, None], kth, torch.full_like(kth, float("-inf")))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if bool(use_p.any()):
        sorted_probs = probs.gather(1, order)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = (cumulative - sorted_probs >= top_p[:, None]) & use_p[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[Request]
                 ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [B, V] (float32, one row per request) -> B tokens, and logprobs where asked for."""
        tokens: list[int | None] = [None] * len(requests)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        seeded = [i for i, r in enumerate(requests) if not r.params.greedy and r.generator is not None]
        free = [i for i, r in enumerate(requests) if not r.params.greedy and r.generator is None]
        if greedy:
            picks = logits[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, picks):
                tokens[i] = t
        if seeded:
            rows = logits[seeded].cpu()
            for j, i in enumerate(seeded):
                tokens[i] = sample(rows[j], requests[i].params, requests[i].generator)
        if free:
            device = logits.device
            params = [requests[i].params for i in free]
            probs = batched_probs(
                logits[free],
                torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32),
                torch.tensor([p.top_k for p in params], device=device),
                torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32),
            )
            for i, t in zip(free, torch.multinomial(probs, 1)[:, 0].tolist()):
                tokens[i] = t
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if wanted:
            rows = logits[wanted].float().cpu()
            for j, i in enumerate(wanted):
                chosen, top = top_logprobs(rows[j], tokens[i], requests[i].params.logprobs)
                logprobs[i] = TokenLogprob(tokens[i], chosen, top)
        return tokens, logprobs
