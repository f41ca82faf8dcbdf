"""`pixtral convert --quantization fp8`: the compressed-tensors layout, through the real CLI, read back by us
(the weights of quantizing on load, bit for bit) and by the compressed-tensors package / transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pixtral.checkpoint import load_model, save_model
from pixtral.cli.main import main
from pixtral.quant import Fp8Linear
from tests.parallel.conftest import prompts, random_pixtral, tp_args

DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def stored(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("name", ["mistral_kv2", "hf_kv1_merge"])
def test_round_trip_through_the_cli(tmp_path, capsys, name):
    model = random_pixtral(tp_args(name), seed=11)
    src = save_model(model, tmp_path / "src", layout="hf" if name.startswith("hf") else "mistral")
    assert main(["convert", str(src), str(tmp_path / "fp8"), "--to", "hf", "--quantization", "fp8"]) == 0
    assert "wrote fp8 (compressed-tensors) hf checkpoint" in capsys.readouterr().out

    tensors = stored(tmp_path / "fp8")
    for key, t in tensors.items():
        module, _, leaf = key.rpartition(".")
        decoder = module.startswith("language_model.model.layers.") and module.rpartition(".")[2] in DECODER
        if leaf == "weight_scale":
            assert decoder and t.dtype == torch.float32 and t.shape == (tensors[module + ".weight"].shape[0], 1)
        else:
            assert t.dtype == (torch.float8_e4m3fn if decoder and leaf == "weight" else torch.float32), key
    assert sum(k.endswith("weight_scale") for k in tensors) == 7 * model.args.n_layers
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "float-quantized"

    loaded = load_model(tmp_path / "fp8", dtype=torch.float32)
    on_load = load_model(src, dtype=torch.float32, quantization="fp8")
    assert (loaded.quantization, loaded.quantization_source) == ("fp8", "checkpoint")
    a, b = dict(loaded.named_parameters()), dict(on_load.named_parameters())
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)) if a[key].element_size() == 1 \
            else torch.equal(a[key], b[key]), key
    for prompt, (ids, images) in prompts(model.args).items():
        with torch.inference_mode():
            assert torch.equal(loaded(ids, images), on_load(ids, images)), prompt


def test_refusals(tmp_path, capsys):
    src = save_model(random_pixtral(tp_args("mistral_kv2")), tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "m"), "--to", "mistral", "--quantization", "fp8"]) == 1
    assert "fp8 in the Hugging Face layout (compressed-tensors) only, not fp8 in the mistral layout" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "fp8"), "--to", "hf", "--quantization", "fp8"]) == 0
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "again"), "--to", "mistral"]) == 1
    assert "already quantized (fp8, compressed-tensors)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "again").exists()


def test_the_compressed_tensors_package_reads_what_convert_writes(tmp_path):
    """Its own config model parses our quantization_config, and transformers (through it) loads the
    directory with every tensor matched: our fp8 weights, decompressed, and the float ones unchanged."""
    pytest.importorskip("compressed_tensors", reason="the compressed-tensors package is not installed "
                                                     "(pip install compressed-tensors)")
    from compressed_tensors.quantization import QuantizationConfig
    transformers = pytest.importorskip("transformers")

    model = random_pixtral(tp_args("hf_kv2"), seed=12)
    src = save_model(model, tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "fp8"), "--to", "hf", "--quantization", "fp8"]) == 0
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"])
    assert qc.config_groups["group_0"].weights.strategy == "channel"
    assert qc.config_groups["group_0"].input_activations.dynamic is True

    theirs, info = transformers.AutoModelForImageTextToText.from_pretrained(
        tmp_path / "fp8", dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, _ = prompts(model.args)["text"]
    with torch.inference_mode():
        theirs(input_ids=ids[None])  # decompresses the weights
    ours = load_model(tmp_path / "fp8", dtype=torch.float32)
    lm = theirs.model.language_model
    assert isinstance(ours.layers[0].feed_forward.w2, Fp8Linear)
    assert torch.equal(lm.layers[0].mlp.down_proj.weight, ours.layers[0].feed_forward.w2.dequantized_weight())
    assert torch.equal(theirs.lm_head.weight, model.output.weight)  # ignored: float, as it was
    assert torch.equal(theirs.model.multi_modal_projector.linear_1.weight, model.vision_language_adapter.w_in.weight)
