"""Tensor parallelism over fp8 checkpoints: each rank reads its slices of the weights and of their scales,
and two gloo ranks give the logits of the whole model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pixtral.checkpoint import load_model, save_model
from pixtral.parallel import load_tp_model, shard_model
from pixtral.parallel.tensor_parallel import RowParallel
from pixtral.quant import Fp8Linear, quantize_linears
from tests.parallel.conftest import prompts, random_pixtral, tp_args
from tests.parallel.ranks import run_ranks
from tests.quant import fp8_writers as w

WORKER = Path(__file__).with_name("tp_fp8_worker.py")
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (directory, the model config it was written from)."""
    root = tmp_path_factory.mktemp("tp_fp8")
    out = {}
    model = random_pixtral(tp_args("hf_kv2"), seed=21)
    w.write_compressed_tensors(model, root / "ct_channel_vision", "channel", quantize_vision=True)
    out["ct_channel_vision"] = (root / "ct_channel_vision", "hf_kv2")
    w.write_transformers_fp8_blocks(model, root / "fp8_blocks", (16, 32))
    out["fp8_blocks"] = (root / "fp8_blocks", "hf_kv2")
    # one KV head replicated on both ranks, replicated vision encoder; per tensor, static activation scales
    w.write_mistral_fp8(random_pixtral(tp_args("mistral_kv1"), seed=22), root / "mistral_tensor")
    out["mistral_tensor"] = (root / "mistral_tensor", "mistral_kv1")
    return out


def fp8_modules(model) -> dict[str, Fp8Linear]:
    return {n: (m.inner if isinstance(m, RowParallel) else m) for n, m in model.named_modules()
            if isinstance(m.inner if isinstance(m, RowParallel) else m, Fp8Linear)}


@pytest.mark.parametrize("name", ["ct_channel_vision", "fp8_blocks", "mistral_tensor"])
def test_each_rank_holds_its_slices_of_weights_and_scales(checkpoints, name):
    path, _ = checkpoints[name]
    whole = fp8_modules(load_model(path, dtype=torch.float32))
    for rank in range(2):
        model = load_tp_model(path, rank, 2, dtype=torch.float32)
        assert (model.quantization, model.quantization_source) == ("fp8", "checkpoint")
        local = fp8_modules(model)
        assert local.keys() == whole.keys()
        split = model.tensor_parallel.plan.splits(rank)
        for module, m in local.items():
            full, s = whole[module], split[module + ".weight"]
            weight, scale = full.weight.view(torch.uint8), full.weight_scale
            if s is not None:
                weight = weight.narrow(s.dim, s.start, s.stop - s.start)
                if m.strategy == "channel" and s.dim == 0:
                    scale = scale[s.start:s.stop]
                elif m.strategy == "block":
                    tile = m.block_size[s.dim]
                    scale = scale.narrow(s.dim, s.start // tile, (s.stop - s.start) // tile)
            assert torch.equal(m.weight.view(torch.uint8), weight), module
            assert torch.equal(m.weight_scale, scale), module
            # read: exactly the kept part (a slice, never the whole, of a split weight's scale)
            assert model.tensor_parallel.read_shapes[module + ".weight"] == tuple(m.weight.shape)
            read_scale = model.tensor_parallel.read_shapes[module + ".weight_scale"]
            assert torch.Size(read_scale).numel() == m.weight_scale.numel(), module
        assert model.tensor_parallel.read_shapes["layers.0.attention.wq.weight"][0] == 32  # 2 of 4 heads of 16


def test_float_checkpoint_quantized_slice_by_slice(tmp_path):
    """quantization= with tensor parallelism: each slice quantized as read, equal to quantize_linears after
    shard_model on the float model (so a row-parallel weight's channel scales are its rank's columns')."""
    model = random_pixtral(tp_args("hf_kv2"), seed=23)
    path = save_model(model, tmp_path / "f", layout="hf")
    for scheme in ("int8", "fp8"):
        for rank in range(2):
            got = load_tp_model(path, rank, 2, dtype=torch.float32, quantization=scheme)
            want = shard_model(copy.deepcopy(model), rank, 2)
            quantize_linears(want, scheme)
            a, b = dict(got.named_parameters()), dict(want.named_parameters())
            assert a.keys() == b.keys() and (got.quantization, got.quantization_source) == (scheme, "on load")
            for n in a:
                assert a[n].dtype == b[n].dtype
                assert torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) if a[n].element_size() == 1 \
                    else torch.equal(a[n], b[n]), n


def test_tp2_on_gloo_equals_tp1(checkpoints, tmp_path):
    """The same stored fp8 weights on two ranks: only the order of float sums differs (all-reduce)."""
    job = {"checkpoints": {n: (str(p), None) for n, (p, _) in checkpoints.items()},
           "prompts": {n: prompts(tp_args(cfg)) for n, (_, cfg) in checkpoints.items()}}
    torch.save(job, tmp_path / "job.pt")
    ranks = run_ranks(WORKER, tmp_path / "job.pt", tmp_path, 2, TIMEOUT_S)
    for name, (path, _) in checkpoints.items():
        whole = load_model(path, dtype=torch.float32)
        for prompt, (ids, images) in job["prompts"][name].items():
            with torch.inference_mode():
                want = whole(ids, images)
            assert want.abs().max() > 1.0
            for r in ranks:
                assert r[name]["quantization"] == ("fp8", "checkpoint")
                torch.testing.assert_close(r[name]["logits"][prompt], want, rtol=1e-4, atol=1e-4,
                                           msg=lambda m, n=name, p=prompt: f"{n} {p}: {m}")
