"""`LLM(path, quantization=...)`: the decoder quantized while the checkpoint loads, in one process
and over two tensor-parallel ranks, and what the engine reports about it.

The quantized weights are `quantize_linears`' (the loader's own weights are checked bit for bit in
tests/quant); here the engine over them answers as the same model quantized in memory does, reports
the scheme, and holds fewer weight bytes.
"""

from __future__ import annotations

import pytest
from tiny_model import image_uri, user

from pixtral.checkpoint import load_model
from pixtral.engine import LLM
from pixtral.generation import SamplingParams
from pixtral.quant import quantize_linears

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
CONVERSATIONS = [[user("Hello there, what is new?")], [user("What is in the picture?", image_uri(3))],
                 [user("Two of them.", image_uri(4), image_uri(5, (64, 64)))]]
OPTIONS = dict(num_blocks=64, max_num_seqs=4)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_on_load_answers_as_the_model_quantized_in_memory(tiny_dir, processor, scheme):
    in_memory = load_model(tiny_dir)
    float_bytes = LLM.from_model(in_memory, processor, **OPTIONS).engine.model_info()["weight_bytes"]
    assert quantize_linears(in_memory, scheme)
    expected = token_ids(LLM.from_model(in_memory, processor, **OPTIONS).chat(CONVERSATIONS, GREEDY))

    llm = LLM(tiny_dir, quantization=scheme, **OPTIONS)
    assert token_ids(llm.chat(CONVERSATIONS, GREEDY)) == expected
    info = llm.engine.model_info()
    assert (info["quantization"], info["quantization_source"], info["dtype"]) == (scheme, "on load", "float32")
    # The decoder's linears go from 4 to 1 byte per weight: the tiny model's embedding and head
    # (131072 x 64 each) dominate, so the whole shrinks by less than the linears do.
    linears = sum(p.numel() for n, p in in_memory.named_parameters()
                  if n.startswith("layers.") and n.endswith(".weight") and p.dim() == 2)
    assert float_bytes - info["weight_bytes"] >= 3 * linears - 4 * 1024  # minus the float32 scales


def test_an_unknown_scheme_is_refused_naming_it(tiny_dir):
    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'"):
        LLM(tiny_dir, quantization="int4")


def test_two_ranks_quantize_their_own_slices(tiny_dir):
    """TP=2 with int8 on load: each rank quantizes its slices (a row-parallel weight's per-channel
    scales are then those of its columns: close to, not equal to, one process's)."""
    first = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    expected = LLM(tiny_dir, quantization="int8", **OPTIONS).chat(CONVERSATIONS, first)
    with LLM(tiny_dir, tensor_parallel_size=2, quantization="int8", **OPTIONS) as llm:
        assert llm.engine.model_info()["quantization"] == "int8"
        got = llm.chat(CONVERSATIONS, first)
    for a, b in zip(got, expected):
        (la,), (lb,) = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert la.token_id == lb.token_id
        assert abs(la.logprob - lb.logprob) < 0.05
