"""Pre-quantized fp8 checkpoints in the three formats, written by an independent writer (fp8_writers.py):
loaded as stored, with the logits of a float model holding the dequantized weights, on text and images.

The comparison is tight (float32 both sides, the same weights: only the order of float operations
may differ), so a wrong scale, a missed permutation or a cast fp8 weight fails it by orders of
magnitude.
"""

from __future__ import annotations

import json

import pytest
import torch

from pixtral.checkpoint import load_model
from pixtral.quant import Fp8Linear
from tests.parallel.conftest import prompts, random_pixtral, tp_args
from tests.quant import fp8_writers as w

TIGHT = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def hf_model():
    return random_pixtral(tp_args("hf_kv2"), seed=3)


@pytest.fixture(scope="module")
def merge_model():  # Mistral3 (patch merger) shape, Mistral layout
    return random_pixtral(tp_args("hf_kv1_merge"), seed=4)


def assert_same_logits(model, reference_state, args, tol=TIGHT):
    ref = w.float_model(args, reference_state)
    for name, (ids, images) in prompts(args).items():
        with torch.inference_mode():
            got, want = model(ids, images), ref(ids, images)
        assert want.abs().max() > 1.0, name  # real logits
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{n}: {m}")


def decoder_modules(model):
    return [layer.attention.wq for layer in model.layers] + [layer.feed_forward.w2 for layer in model.layers]


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors(tmp_path, hf_model, strategy):
    ref = w.write_compressed_tensors(hf_model, tmp_path / "ct", strategy)
    model = load_model(tmp_path / "ct", dtype=torch.float32)
    assert (model.quantization, model.quantization_source, model.quantization_format) == (
        "fp8", "checkpoint", "compressed-tensors")
    for m in decoder_modules(model):
        assert type(m) is Fp8Linear and m.weight.dtype == w.E4M3 and m.strategy == strategy
        assert m.weight_scale.dtype == torch.float32 and m.input_scale is None
    # the ignore list: head, vision encoder and adapter stay float
    assert type(model.output) is torch.nn.Linear and model.output.weight.dtype == torch.float32
    assert type(model.vision_encoder.transformer.layers[0].attention.wq) is torch.nn.Linear
    assert_same_logits(model, ref, hf_model.args)


def test_compressed_tensors_static_inputs_and_a_quantized_vision_encoder(tmp_path, hf_model):
    ref = w.write_compressed_tensors(hf_model, tmp_path / "ct", "channel", static_input=True, quantize_vision=True)
    model = load_model(tmp_path / "ct", dtype=torch.float32)
    venc = model.vision_encoder.transformer.layers[1]
    for m in decoder_modules(model) + [venc.attention.wk, venc.feed_forward.w3]:
        assert type(m) is Fp8Linear and m.input_scale is not None and m.input_scale.item() == pytest.approx(0.05)
    assert_same_logits(model, ref, hf_model.args)  # on the CPU activations stay float: the static scale is unused


def test_transformers_fp8_block_scales(tmp_path, hf_model):
    # 16 x 48 tiles: whole heads of 16 rows; 64 and 128 columns leave partial last tiles
    ref = w.write_transformers_fp8_blocks(hf_model, tmp_path / "fp8", (16, 48))
    model = load_model(tmp_path / "fp8", dtype=torch.float32)
    assert model.quantization_format == "fp8"
    for m in decoder_modules(model):
        assert m.strategy == "block" and m.block_size == (16, 48)
    assert model.layers[0].feed_forward.w2.weight_scale.shape == (4, 3)
    assert_same_logits(model, ref, hf_model.args)


@pytest.mark.parametrize("per_channel,static_act", [(False, True), (True, False)])
def test_mistral_format(tmp_path, merge_model, per_channel, static_act):
    ref = w.write_mistral_fp8(merge_model, tmp_path / "mistral", per_channel, static_act)
    model = load_model(tmp_path / "mistral", dtype=torch.float32)
    assert (model.quantization, model.quantization_format) == ("fp8", "mistral")
    for m in decoder_modules(model):
        assert m.strategy == ("channel" if per_channel else "tensor") and (m.input_scale is not None) == static_act
    assert type(model.patch_merger.merging_layer) is torch.nn.Linear
    assert_same_logits(model, ref, merge_model.args)


def test_bfloat16_load_keeps_fp8_weights_and_float32_scales(tmp_path, hf_model):
    w.write_compressed_tensors(hf_model, tmp_path / "ct", "tensor")
    model = load_model(tmp_path / "ct", dtype=torch.bfloat16)
    wq = model.layers[0].attention.wq
    assert wq.weight.dtype == w.E4M3 and wq.weight_scale.dtype == torch.float32 and wq.weight_scale.shape == ()
    assert model.layers[0].attention_norm.weight.dtype == torch.bfloat16


def test_as_stored_or_refused_for_another_scheme(tmp_path, hf_model):
    w.write_compressed_tensors(hf_model, tmp_path / "ct", "channel")
    assert load_model(tmp_path / "ct", dtype=torch.float32, quantization="fp8").quantization_source == "checkpoint"
    with pytest.raises(ValueError, match=r"quantized as fp8 \(compressed-tensors\).*cannot be loaded as int8"):
        load_model(tmp_path / "ct", quantization="int8")


def both_logits(theirs, ours, args, image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' and our logits for a few text tokens around one image of `prompts(args)`."""
    text, _ = prompts(args)["text"]  # no image token among these
    img = prompts(args)["images"][1][image]
    v = args.vision
    n = (img.shape[1] // v.patch_size) * (img.shape[2] // v.patch_size)
    ids = torch.cat([text[:3], torch.full((n,), v.image_token_id), text[3:8]])
    with torch.inference_mode():
        got = theirs(input_ids=ids[None], pixel_values=img[None],
                     image_sizes=torch.tensor([list(img.shape[1:])])).logits[0]
        want = ours(ids, [img])
    assert want.abs().max() > 1.0
    return got, want


def test_transformers_reads_our_reading_of_compressed_tensors(tmp_path, hf_model, monkeypatch):
    """transformers (through the compressed-tensors package) loading the same directory.

    On the CPU transformers decompresses the weights to float (bit-equal to ours, checked) and then
    runs compressed-tensors' emulation of the scheme: the activations of every quantized linear are
    fake-quantized to e4m3 per token (the dynamic input_activations of the config). Our CPU path keeps
    activations in float, so for the logits our Fp8Linear is given the same activation fake-quantization.
    """
    pytest.importorskip("compressed_tensors", reason="the compressed-tensors package (transformers' reader) "
                                                     "is not installed: pip install compressed-tensors")
    transformers = pytest.importorskip("transformers")
    w.write_compressed_tensors(hf_model, tmp_path / "ct", "channel")
    ours = load_model(tmp_path / "ct", dtype=torch.float32)
    theirs = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    from pixtral.quant import quantize_fp8_per_token

    plain = Fp8Linear.linear_without_bias

    def with_fp8_activations(self, x):
        xq, s = quantize_fp8_per_token(x.reshape(-1, self.in_features))
        return plain(self, (xq.float() * s).reshape(x.shape).to(x.dtype))

    monkeypatch.setattr(Fp8Linear, "linear_without_bias", with_fp8_activations)
    got, want = both_logits(theirs, ours, hf_model.args, image=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # its weights, decompressed on the first forward, are ours bit for bit (q_proj rows in HF order)
    lm = theirs.model.language_model
    wq = w.rotate_half_rows(ours.layers[1].attention.wq.dequantized_weight(), hf_model.args.n_heads)
    assert torch.equal(lm.layers[1].self_attn.q_proj.weight, wq)
    assert torch.equal(lm.layers[0].mlp.down_proj.weight, ours.layers[0].feed_forward.w2.dequantized_weight())


def test_config_written_as_the_package_reads_it(tmp_path, hf_model):
    """The independent writer's config parses in compressed-tensors itself (the fields are real)."""
    ct = pytest.importorskip("compressed_tensors.quantization", reason="compressed-tensors not installed")
    w.write_compressed_tensors(hf_model, tmp_path / "ct", "channel")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    parsed = ct.QuantizationConfig.model_validate(qc)
    assert parsed.config_groups["group_0"].weights.strategy == "channel"


def test_transformers_reads_our_reading_of_fp8_blocks(tmp_path, hf_model):
    """transformers' own fine-grained fp8 reader on the same directory: on the CPU it dequantizes the
    weights (to float32 here) and runs them in float, as we do. Its CPU dequantizer refuses partial
    tiles ("not divisible by scale grid"), so the tiles here divide the weights (ours take partial
    ones: test_transformers_fp8_block_scales)."""
    transformers = pytest.importorskip("transformers")
    w.write_transformers_fp8_blocks(hf_model, tmp_path / "fp8", (16, 32))
    ours = load_model(tmp_path / "fp8", dtype=torch.float32)
    theirs = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    got, want = both_logits(theirs, ours, hf_model.args, image=0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    down = theirs.model.language_model.layers[0].mlp.down_proj.weight
    assert torch.equal(down, ours.layers[0].feed_forward.w2.dequantized_weight())
