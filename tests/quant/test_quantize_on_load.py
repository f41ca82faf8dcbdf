"""Quantizing a float checkpoint while loading it: the weights `quantize_linears` gives the float model,
bit for bit, without ever holding the float model."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixtral.checkpoint import load_model, save_model
from pixtral.model import ModelArgs
from pixtral.quant import DECODER_LINEARS, Fp8Linear, Int8WeightLinear, quantize_linears
from tests.parallel.conftest import prompts, random_pixtral, tp_args

REPO = Path(__file__).resolve().parents[2]
CLASSES = {"int8": Int8WeightLinear, "fp8": Fp8Linear}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize("layout", ["mistral", "hf"])
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_equals_quantize_linears_on_the_float_model(tmp_path, layout, scheme):
    model = random_pixtral(tp_args("hf_kv2" if layout == "hf" else "mistral_kv1"), seed=7)
    path = save_model(model, tmp_path / layout, layout=layout)
    got = load_model(path, dtype=torch.float32, quantization=scheme)
    want = copy.deepcopy(model)
    quantize_linears(want, scheme)
    assert (got.quantization, got.quantization_source, got.quantization_format) == (scheme, "on load", None)
    a, b = dict(got.named_parameters()), dict(want.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(as_bits(a[name]), as_bits(b[name])), name
    quantized = [n for n, m in got.named_modules() if isinstance(m, CLASSES[scheme])]
    assert len(quantized) == len(DECODER_LINEARS) * model.args.n_layers
    ids, images = prompts(model.args)["images"]
    with torch.inference_mode():
        assert torch.equal(got(ids, images), want(ids, images))


def test_float_checkpoint_without_a_scheme_stays_float(tmp_path):
    path = save_model(random_pixtral(tp_args("hf_kv2")), tmp_path / "m")
    model = load_model(path, dtype=torch.float32)
    assert (model.quantization, model.quantization_source) == (None, None)
    assert not any(isinstance(m, (Fp8Linear, Int8WeightLinear)) for m in model.modules())
    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'"):
        load_model(path, quantization="int4")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[Path, int]:
    """4 layers of dim 1024, FFN 4096, stored in bfloat16 and loaded in float32: 256 MB of float32 decoder
    linears, big against one tensor (16 MB). bfloat16 on disk because a float32 tensor read from a
    memory-mapped file and kept as it is stays file-backed (not anonymous memory); cast, it is a copy."""
    args = ModelArgs(dim=1024, n_layers=4, head_dim=128, hidden_dim=4096, n_heads=8, n_kv_heads=8,
                     vocab_size=256, norm_eps=1e-5, max_seq_len=512, vision=None)
    model = random_pixtral(args)
    path = save_model(model, tmp_path_factory.mktemp("big") / "m", dtype=torch.bfloat16)
    linear_bytes = sum(p.numel() * 4 for n, p in model.named_parameters()
                       if n.rsplit(".", 2)[-2] in DECODER_LINEARS)
    return path, linear_bytes


def peak(path: Path, mode: str) -> dict:
    # MALLOC_MMAP_THRESHOLD_: every large block is its own mapping, returned to the system when freed, so
    # the anonymous memory is what is alive (glibc's default, a threshold that rises as blocks are freed,
    # keeps freed blocks in its heap by chance: measured peaks then varied from 150 to 290 MB, run to run)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("peak_memory_worker.py")), str(path), mode],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc/self/status (RssAnon)")
def test_peak_memory_stays_below_a_float_copy(big_checkpoint):
    path, linear_bytes = big_checkpoint
    naive = peak(path, "float-then-quantize")
    # the measurement sees a full float copy when there is one (measured: 367 MB) ...
    assert naive["peak_increase"] > linear_bytes, naive
    on_load = peak(path, "on-load")
    # ... and quantizing while loading holds the int8 model (70 MB) plus one tensor's temporaries (the
    # 16 MB float32 weight and its copies while quantizing; measured 111-116 MB in all), well below it
    assert on_load["model_bytes"] < 0.3 * linear_bytes
    assert on_load["peak_increase"] < on_load["model_bytes"] + 0.35 * linear_bytes, (on_load, linear_bytes)
