"""The sampling filter's edge rows: non-finite logits, ties, and rows that are partly -inf."""

import pytest
import torch

from pixtral.generation.params import SamplingParams
from pixtral.generation.sampling import NonFiniteLogitsError, finite_rows, greedy, sample

V = 131072  # the real vocabulary: the reductions run over rows this long


def rows() -> torch.Tensor:
    x = torch.randn(6, V)
    x[1, 77] = float("nan")
    x[2, V - 1] = float("inf")
    x[3] = float("-inf")
    x[4, : V - 1] = float("-inf")  # every token but the last is "never": still a valid row
    x[5] = 0.0
    x[5, [9, 4000, V - 2]] = 1.0  # a three-way tie
    return x


def test_greedy_takes_the_maximum_and_flags_rows_that_cannot_be_sampled():
    x = rows()
    tokens, finite = greedy(x)
    assert finite.tolist() == [True, False, False, False, True, True]
    assert finite_rows(x).tolist() == finite.tolist()
    assert tokens[0] == x[0].argmax() and tokens[4] == V - 1
    assert tokens[5] == 9  # ties go to the lowest id, as argmax's
    assert torch.equal(greedy(torch.randn(3, 1))[0], torch.zeros(3, dtype=torch.long))  # a one-token vocabulary


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.5)])
def test_sample_refuses_non_finite_rows_and_takes_partly_infinite_ones(params):
    x = rows()
    generator = torch.Generator().manual_seed(0)
    for i in (1, 2, 3):
        with pytest.raises(NonFiniteLogitsError):
            sample(x[i], params, generator)
    assert sample(x[4], params, generator) == V - 1  # the only token left
    assert sample(x[0], SamplingParams(temperature=0)) == int(x[0].argmax())
