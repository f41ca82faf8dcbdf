"""`quantize_linears` on a small random Pixtral: logits near the float model's, and composed with tensor parallelism.

Tolerances are on max |logits difference| / std(float logits) over a 24-token prompt of the `tiny`
preset (vocabulary cut to 1024) with random weights; measured over seeds 0-2 (per-channel and
per-tensor): int8 0.007-0.012, fp8 0.049-0.061. The bounds below leave about 2.5x room.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from pixtral.model.pixtral import Pixtral
from pixtral.model.presets import preset
from pixtral.quant import DECODER_LINEARS, Fp8Linear, Int8WeightLinear, quantize_linears
from tests.parallel.ranks import run_ranks

WORKER = Path(__file__).with_name("tp_quant_worker.py")
TOLERANCE = {"int8": 0.03, "fp8": 0.15}  # max |diff| / std(reference logits)
CLASSES = {"int8": Int8WeightLinear, "fp8": Fp8Linear}
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def tiny():
    args = dataclasses.replace(preset("tiny"), vocab_size=1024)
    torch.manual_seed(0)
    model = Pixtral(args).eval().requires_grad_(False)
    ids = torch.randint(0, 1000, (24,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids)
    return model, ids, ref


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_model_logits_close_to_float(tiny, scheme, per_channel):
    model, ids, ref = tiny
    q = copy.deepcopy(model)
    names = quantize_linears(q, scheme, per_channel=per_channel)
    assert len(names) == len(DECODER_LINEARS) * len(q.layers)
    for layer in q.layers:
        for m in (layer.attention.wq, layer.attention.wo, layer.feed_forward.w1, layer.feed_forward.w2):
            assert type(m) is CLASSES[scheme]
    assert type(q.output) is nn.Linear  # the head, the vision encoder and the adapter stay float
    assert all(type(m) in (nn.Linear,) for n, m in q.named_modules()
               if n.startswith(("vision_encoder", "vision_language_adapter")) and isinstance(m, nn.Linear))
    # names: the float model's plus a weight_scale per quantized linear
    expected = set(dict(model.named_parameters())) | {n + ".weight_scale" for n in names}
    assert set(dict(q.named_parameters())) == expected
    with torch.inference_mode():
        out = q(ids)
    diff = (out - ref).abs().max() / ref.std()
    assert 0 < diff < TOLERANCE[scheme], f"{scheme}: {diff:.4f}"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9  # greedy tokens mostly agree


def test_output_head_on_request_and_refusals(tiny):
    model, ids, ref = tiny
    q = copy.deepcopy(model)
    names = quantize_linears(q, "int8", output=True)
    assert names[-1] == "output" and type(q.output) is Int8WeightLinear
    assert quantize_linears(q, "int8", output=True) == []  # already quantized: left alone
    with torch.inference_mode():
        assert (q(ids) - ref).abs().max() / ref.std() < TOLERANCE["int8"]
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize_linears(copy.deepcopy(model), "int4")


def test_quantized_tp2_on_gloo_matches_quantized_tp1(tiny, tmp_path):
    """Shard over two gloo ranks, then quantize: the logits match the quantized whole model.

    Not bit-equal: a row-parallel weight's per-channel scales are its rank's columns', so the
    quantization differs slightly from the whole row's.
    """
    model, ids, ref = tiny
    schemes = ["int8", "fp8"]
    job = tmp_path / "job.pt"
    torch.save({"args": model.args, "state": model.state_dict(), "ids": ids, "schemes": schemes}, job)
    ranks = run_ranks(WORKER, job, tmp_path, 2, TIMEOUT_S)
    float_names = sorted(n for n, _ in model.named_parameters() if n.startswith("layers.0."))
    for scheme in schemes:
        whole = copy.deepcopy(model)
        quantize_linears(whole, scheme)
        with torch.inference_mode():
            expected = whole(ids)
        for r in ranks:
            got = r[scheme]
            assert got["wo"] == ("RowParallel", CLASSES[scheme].__name__)
            assert len(got["names"]) == len(DECODER_LINEARS) * len(model.layers)
            # the float names, plus the scales: `layers.0.attention.wo.weight`, not `...wo.inner.weight`
            assert [n for n in got["params"] if not n.endswith("weight_scale")] == float_names
            diff = (got["logits"] - expected).abs().max() / ref.std()
            assert diff < TOLERANCE[scheme] / 2, f"{scheme}: {diff:.4f}"
        assert torch.equal(ranks[0][scheme]["logits"], ranks[1][scheme]["logits"])
