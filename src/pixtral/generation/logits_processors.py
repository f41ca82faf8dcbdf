"""What a request's parameters do to the logits before a token is picked: one function for every path.

`process_logits` takes rows of raw logits and, for each row, the sequence so far; the engine's
sampler calls it on the device for the rows that need it (`SamplingParams.processes_logits`), and the
one-sequence loop of `pixtral.generation` on a batch of one, so a request gets the same tokens
from both. In order, as vLLM and OpenAI define them:

1. `logit_bias`: added to the named tokens' logits, before anything else;
2. `min_tokens`: EOS and the stop token ids get -inf until that many tokens are generated;
3. `repetition_penalty` (over the prompt and the generated tokens): a positive logit is divided by
   it, a negative one multiplied;
4. `frequency_penalty` and `presence_penalty` (over the generated tokens only):
   logit -= frequency_penalty * count + presence_penalty * (count > 0).

A per-row mask of allowed tokens (structured outputs) belongs between steps 2 and 3: -inf for the
tokens it forbids, before the penalties see them.

`min_p` is part of the probability filter (`sampling.batched_probs`): it is relative to the most
likely token after temperature, so it does not change the logits here.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from pixtral.generation.params import SamplingParams

# A repetition penalty far from 1 must not overflow a logit: held within this bound, a logit stays
# finite after division by any temperature that is not greedy (>= 1e-5), so the row can still be sampled.
LOGIT_LIMIT = 1e30


@dataclass
class RowState:
    """What the processing of one row needs to know about its sequence."""

    params: SamplingParams
    token_ids: Sequence[int]  # the prompt, then the tokens generated so far
    prompt_len: int
    stop_ids: Collection[int]  # the ids that `min_tokens` holds back (EOS unless ignored, stop_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len


def process_logits(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Rows of logits [B, V] -> processed float32 logits [B, V] (a new tensor)."""
    logits = logits.float().clone()
    device, vocab = logits.device, logits.shape[-1]
    _add_logit_bias(logits, rows, device)
    _hold_back_stops(logits, rows, device)
    penalized = [i for i, r in enumerate(rows)
                 if r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty]
    if penalized:
        logits[penalized] = _penalize(logits[penalized], [rows[i] for i in penalized], vocab, device)
    return logits


def _add_logit_bias(logits: torch.Tensor, rows: Sequence[RowState], device) -> None:
    index_rows, index_tokens, values = [], [], []
    for i, r in enumerate(rows):
        for token, bias in (r.params.logit_bias or {}).items():
            index_rows.append(i)
            index_tokens.append(token)
            values.append(float(bias))
    if values:
        logits.index_put_((torch.tensor(index_rows, device=device), torch.tensor(index_tokens, device=device)),
                          torch.tensor(values, device=device, dtype=logits.dtype), accumulate=True)


def _hold_back_stops(logits: torch.Tensor, rows: Sequence[RowState], device) -> None:
    index_rows, index_tokens = [], []
    for i, r in enumerate(rows):
        if r.num_generated < r.params.min_tokens:
            ids = sorted(t for t in r.stop_ids if t < logits.shape[-1])  # an id past the vocabulary never comes
            index_rows += [i] * len(ids)
            index_tokens += ids
    if index_rows:
        logits[torch.tensor(index_rows, device=device), torch.tensor(index_tokens, device=device)] = float("-inf")


def _penalize(logits: torch.Tensor, rows: Sequence[RowState], vocab: int, device) -> torch.Tensor:
    """The penalties of rows [R, V], from a count of each row's generated tokens (one scatter-add)."""
    generated = _padded([r.token_ids[r.prompt_len:] for r in rows], vocab, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)  # column `vocab` takes the padding
    counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=counts.dtype))
    counts = counts[:, :vocab]

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(r.params, name) for r in rows], device=device, dtype=torch.float32)[:, None]

    repetition = column("repetition_penalty")
    if bool((repetition != 1.0).any()):
        prompts = _padded([r.token_ids[:r.prompt_len] for r in rows], vocab, device)
        seen = torch.zeros(len(rows), vocab + 1, device=device, dtype=torch.bool)
        seen.scatter_(1, prompts, True)
        seen = seen[:, :vocab] | (counts > 0)
        scaled = torch.where(logits > 0, logits / repetition, logits * repetition).clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
        logits = torch.where(seen, scaled, logits)
    return logits - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)


def _padded(sequences: list[Sequence[int]], pad: int, device) -> torch.Tensor:
    """Token id lists as one [R, longest] tensor, padded with `pad` (an id past the vocabulary)."""
    width = max(1, max(len(s) for s in sequences))
    out = torch.full((len(sequences), width), pad, dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out.to(device)
