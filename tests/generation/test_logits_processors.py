"""`process_logits` and min-p against the definitions, row by row, on random logits."""

from __future__ import annotations

import math

import pytest
import torch

from pixtral.generation import SamplingParams
from pixtral.generation.logits_processors import LOGIT_LIMIT, RowState, process_logits
from pixtral.generation.sampling import batched_probs, parameter_tensors

VOCAB = 50
PROMPT = [1, 4, 4, 9]
GENERATED = [7, 9, 7, 7, 12]
STOPS = {2, 3}


def by_definition(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    out = logits.clone()
    for token, bias in (p.logit_bias or {}).items():
        out[token] += bias
    if len(GENERATED) < p.min_tokens:
        out[sorted(STOPS)] = float("-inf")
    for token in set(PROMPT + GENERATED):
        value = float(out[token])
        out[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token in set(GENERATED):
        out[token] -= p.frequency_penalty * GENERATED.count(token) + p.presence_penalty
    return out


ROWS = [
    SamplingParams(),  # untouched
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=-0.7),
    SamplingParams(repetition_penalty=1.9),
    SamplingParams(repetition_penalty=0.4, presence_penalty=0.3, frequency_penalty=0.2),
    SamplingParams(logit_bias={3: 100, 7: -2.5, 40: -100}),
    SamplingParams(min_tokens=6),
    SamplingParams(min_tokens=5),  # reached: nothing held back
    SamplingParams(logit_bias={7: 1.0}, repetition_penalty=1.3, min_tokens=9, frequency_penalty=2.0),
]


def test_every_row_follows_the_definition():
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), VOCAB) * 4
    states = [RowState(p, PROMPT + GENERATED, len(PROMPT), STOPS) for p in ROWS]
    out = process_logits(logits, states)
    for i, p in enumerate(ROWS):
        torch.testing.assert_close(out[i], by_definition(logits[i], p), msg=f"row {i}")
    torch.testing.assert_close(out[0], logits[0])
    assert bool(torch.isinf(out[6, sorted(STOPS)]).all()) and not bool(torch.isinf(out[7]).any())
    # A row alone gives what it gives in the batch (so a seeded request is the same alone and batched).
    for i in range(len(ROWS)):
        torch.testing.assert_close(process_logits(logits[i:i + 1], states[i:i + 1])[0], out[i])


def test_a_tiny_repetition_penalty_stays_finite():
    logits = torch.tensor([[30.0, -30.0, 5.0]])
    out = process_logits(logits, [RowState(SamplingParams(repetition_penalty=1e-38), [0, 1], 2, set())])
    assert bool(torch.isfinite(out).all())  # 30 / 1e-38 overflows float32: held at the largest safe logit
    assert float(out[0, 0]) == pytest.approx(LOGIT_LIMIT) and float(out[0, 2]) == 5.0  # 2 is not in the sequence
    probs = batched_probs(out, *parameter_tensors([SamplingParams(temperature=1e-5)], 3, "cpu"))
    assert bool(torch.isfinite(probs).all()) and float(probs[0, 0]) == pytest.approx(1.0)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_drops_tokens_below_min_p_times_the_top(min_p):
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB) * 2
    params = [SamplingParams(min_p=min_p, temperature=t) for t in (1.0, 0.5, 2.0)]
    probs = batched_probs(logits, *parameter_tensors(params, VOCAB, "cpu"))
    for row, p in enumerate(params):
        full = torch.softmax(logits[row] / p.temperature, -1)
        kept = full >= min_p * full.max()
        assert torch.equal(probs[row] > 0, kept)
        torch.testing.assert_close(probs[row], torch.where(kept, full, 0.0) / full[kept].sum())


@pytest.mark.parametrize("field, bad, edges", [
    ("presence_penalty", [2.01, -2.01, math.nan, "x"], [2.0, -2.0]),
    ("frequency_penalty", [2.01, -2.01, math.inf], [2.0, -2.0]),
    ("repetition_penalty", [0, -1.0, math.inf, math.nan], [1e-9, 100.0]),
    ("min_p", [-0.01, 1.01, math.nan], [0.0, 1.0]),
    ("min_tokens", [-1, 1.5, True], [0, 10]),
    ("n", [0, 17, 2.0, True], [1, 16]),
])
def test_sampling_params_ranges(field, bad, edges):
    from pixtral.errors import RequestError

    for value in bad:
        with pytest.raises(RequestError, match=f"'{field}'"):
            SamplingParams(max_tokens=10, **{field: value})
    for value in edges:
        SamplingParams(max_tokens=10, **{field: value})


def test_logit_bias_and_min_tokens_checks():
    from pixtral.errors import RequestError

    for bias in ({1: 100.01}, {1: -101}, {-1: 1}, {"1": 1}, {i: 1 for i in range(1025)}, [1]):
        with pytest.raises(RequestError, match="'logit_bias'"):
            SamplingParams(logit_bias=bias)
    SamplingParams(logit_bias={i: 100 if i % 2 else -100 for i in range(1024)})
    with pytest.raises(RequestError, match="'min_tokens' \\(5\\) must not exceed 'max_tokens' \\(4\\)"):
        SamplingParams(max_tokens=4, min_tokens=5)
    SamplingParams(max_tokens=4, min_tokens=4)
