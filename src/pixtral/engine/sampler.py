"""Pick the next token for every sequence of a batch, each with its own sampling parameters.

Greedy rows take the argmax. Rows with a seed use the reference sampler with their own
generator, on the CPU, so a seeded request gives the same tokens alone, in any batch, and in
`pixtral.generation`. Other rows are sampled together: temperature, top-k and top-p applied
per row in one pass (`pixtral.generation.sampling.batched_probs`), then one multinomial draw.

A row whose logits hold NaN or +inf (or only -inf) gets an error instead of a token, and only that row: the
others of the batch are sampled as usual.
"""

from __future__ import annotations

import torch

from pixtral.engine.outputs import TokenLogprob
from pixtral.engine.request import Request
from pixtral.generation.sampling import (NonFiniteLogitsError, batched_probs, greedy, parameter_tensors, sample,
                                         top_logprobs)


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[Request]
                 ) -> tuple[list[int | None], list[TokenLogprob | None], dict[int, Exception]]:
        """logits [B, V] (float32, one row per request) -> B tokens, logprobs where asked for, and
        the errors of the rows that could not be sampled (their token is None)."""
        tokens: list[int | None] = [None] * len(requests)
        best, finite = greedy(logits)  # one pass: the greedy tokens, and which rows hold NaN or inf
        finite = finite.tolist()
        errors: dict[int, Exception] = {
            i: NonFiniteLogitsError("the model produced non-finite logits (NaN or inf) for this sequence")
            for i, ok in enumerate(finite) if not ok}
        rows = [i for i in range(len(requests)) if i not in errors]
        argmax = [i for i in rows if requests[i].params.greedy]
        seeded = [i for i in rows if not requests[i].params.greedy and requests[i].generator is not None]
        free = [i for i in rows if not requests[i].params.greedy and requests[i].generator is None]
        if argmax:
            for i, t in zip(argmax, best[argmax].tolist()):
                tokens[i] = t
        if seeded:
            cpu_rows = logits[seeded].cpu()
            for j, i in enumerate(seeded):
                tokens[i] = sample(cpu_rows[j], requests[i].params, requests[i].generator)
        if free:
            probs = batched_probs(logits[free], *parameter_tensors([requests[i].params for i in free],
                                                                   logits.shape[-1], logits.device))
            for i, t in zip(free, torch.multinomial(probs, 1)[:, 0].tolist()):
                tokens[i] = t
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        wanted = [i for i in rows if requests[i].params.logprobs is not None]
        if wanted:
            cpu_rows = logits[wanted].float().cpu()
            for j, i in enumerate(wanted):
                chosen, top = top_logprobs(cpu_rows[j], tokens[i], requests[i].params.logprobs)
                logprobs[i] = TokenLogprob(tokens[i], chosen, top)
        return tokens, logprobs, errors
