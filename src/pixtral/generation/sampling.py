"""Pick the next token from logits: greedy, or temperature with min-p / top-k / top-p; and which tokens stop.

One filter for every path: the engine filters many rows at once with `batched_probs`, and the
one-row reference loop calls the same function on a batch of one. The filter is safe for every
value `SamplingParams` accepts: a temperature below `GREEDY_TEMPERATURE` means greedy (dividing
by it would overflow float32 logits), top-k is clamped to the vocabulary, and top-p always keeps
the most likely token (a tiny top_p rounds to 0 in float32, which would otherwise drop them all).
Penalties and logit_bias are applied to the logits before any of this (`logits_processors`).
"""

from __future__ import annotations

import torch

from pixtral.errors import PixtralError
from pixtral.generation.params import GREEDY_TEMPERATURE, SamplingParams

FLOAT32_MAX = torch.finfo(torch.float32).max


class NonFiniteLogitsError(PixtralError):
    """The model produced NaN or +inf logits for a sequence (a numerical fault, not the request's)."""


def stop_token_ids(params: SamplingParams, eos_id: int) -> frozenset[int]:
    """The token ids that end a sequence: the request's own, and EOS unless `ignore_eos`."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else {eos_id})


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def parameter_tensors(params: list[SamplingParams], vocab: int, device: torch.device | str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p and min-p of each row as tensors, with top_k clamped to the vocabulary
    (the API accepts any integer, and torch.tensor overflows past 2**63)."""
    return (torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32),  # 1e308: inf
            torch.tensor([min(p.top_k, vocab) for p in params], device=device, dtype=torch.long),
            torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32),
            torch.tensor([p.min_p for p in params], device=device, dtype=torch.float32))


def batched_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of logits [B, V] -> probabilities: softmax(logits / temperature) within min-p, top-k and top-p
    (in that order, as vLLM)."""
    temperature = temperature.float().clamp(min=GREEDY_TEMPERATURE, max=FLOAT32_MAX)
    logits = logits.float() / temperature[:, None]
    vocab = logits.shape[-1]
    if min_p is not None and bool((min_p > 0).any()):
        # p < min_p * p_max, in log space: logit < max logit + log(min_p) (log 0 = -inf drops nothing).
        floor = logits.amax(dim=-1, keepdim=True) + torch.log(min_p.float())[:, None]
        logits = logits.masked_fill(logits < floor, float("-inf"))
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
        # Keep the smallest prefix whose mass reaches top_p, and always the most likely token.
        drop = (cumulative - sorted_probs >= top_p[:, None]) & use_p[:, None]
        drop[:, 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row of logits [V] -> probabilities, by the batched filter."""
    return batched_probs(logits[None], *parameter_tensors([params], logits.shape[-1], logits.device))[0]


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of logits [B, V] -> (most likely token of each row, whether the row can be sampled).

    One reduction gives both: a row's maximum is NaN if it holds a NaN, +inf if it holds +inf, and
    -inf if every token is -inf; any of these leaves nothing to sample. (`max` also costs half of
    `argmax` on the CPU, and a separate NaN scan over a 131072-token vocabulary cost more than the
    rest of sampling.) Ties go to the lowest token id, as with `argmax`.
    """
    values, tokens = logits.max(dim=-1)
    return tokens, torch.isfinite(values)


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows that can be sampled (see `greedy`)."""
    return torch.isfinite(logits.amax(dim=-1))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One row of logits [V], already processed (`logits_processors.process_logits`) -> a token."""
    token, finite = greedy(logits[None])
    if not bool(finite[0]):
        raise NonFiniteLogitsError("the model produced non-finite logits (NaN or inf) for this sequence")
    if params.greedy:
        return int(token[0])
    probs = filtered_probs(logits, params)
    return int(torch.multinomial(probs.to(generator.device if generator else probs.device), 1, generator=generator))


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of the chosen token and the k most likely alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives = []
    k = min(k, logp.shape[-1])
    if k:
        values, ids = torch.topk(logp, k)
        alternatives = [(int(i), float(v)) for i, v in zip(ids, values)]
    return float(logp[token]), alternatives
