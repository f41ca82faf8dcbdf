"""Pick the next token for every sequence of a batch, each with its own sampling parameters.

First the rows whose parameters change the logits (penalties, logit_bias, min_tokens) are processed
together on the device (`pixtral.generation.logits_processors`); the others are not touched. Rows
held to a grammar (structured outputs) then lose their forbidden tokens (`pixtral.structured.masks`,
masks computed during the forward pass). Then greedy rows take the argmax. Rows with a seed use the
reference sampler with their own generator, on the CPU, so a seeded request gives the same tokens
alone, in any batch, and in `pixtral.generation`. Other rows are sampled together: temperature,
top-k and top-p applied per row in one pass (`pixtral.generation.sampling.batched_probs`), then one multinomial draw.
Logprobs are those of the model's own distribution (the raw logits), as vLLM returns by default.

A row whose logits hold NaN or +inf (or only -inf) gets an error instead of a token, and only that row: the
others of the batch are sampled as usual.
"""

from __future__ import annotations

import torch

from pixtral.engine.outputs import TokenLogprob
from pixtral.engine.request import Request
from pixtral.generation.logits_processors import RowState, process_logits
from pixtral.generation.sampling import (NonFiniteLogitsError, batched_probs, greedy, parameter_tensors, sample,
                                         top_logprobs)
from pixtral.structured.masks import MaskBatch


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[Request], masks: MaskBatch | None = None
                 ) -> tuple[list[int | None], list[TokenLogprob | None], dict[int, Exception]]:
        """logits [B, V] (float32, one row per request) -> B tokens, logprobs where asked for, and
        the errors of the rows that could not be sampled (their token is None). `masks`: the grammar
        masks of the constrained rows (`Engine.step` starts them before the forward pass)."""
        tokens: list[int | None] = [None] * len(requests)
        raw = logits
        logits = self.process(logits, requests)
        grammar_errors: dict[int, Exception] = {}
        if masks is not None:
            logits, grammar_errors = masks.apply(logits, [r.request_id for r in requests])
        best, finite = greedy(logits)  # one pass: the greedy tokens, and which rows hold NaN or inf
        finite = finite.tolist()
        errors: dict[int, Exception] = {
            i: NonFiniteLogitsError("the model produced non-finite logits (NaN or inf) for this sequence")
            for i, ok in enumerate(finite) if not ok}
        errors.update(grammar_errors)
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
            cpu_rows = raw[wanted].float().cpu()
            for j, i in enumerate(wanted):
                chosen, top = top_logprobs(cpu_rows[j], tokens[i], requests[i].params.logprobs)
                logprobs[i] = TokenLogprob(tokens[i], chosen, top)
        return tokens, logprobs, errors

    @staticmethod
    def process(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The logits with the rows that need it processed (a copy; `logits` itself when none does)."""
        rows = [i for i, r in enumerate(requests) if r.params.processes_logits]
        if not rows:
            return logits
        states = [RowState(requests[i].params, requests[i].token_ids, requests[i].prompt_len, requests[i].stop_ids)
                  for i in rows]
        processed = logits.clone()
        processed[rows] = process_logits(logits[rows], states)
        return processed
