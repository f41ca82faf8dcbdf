"""Training runs on a tiny config: loss goes down, exact resume after kill -9, torchrun parity, LoRA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pixtral.checkpoint import load_model
from pixtral.errors import ConfigError
from pixtral.model.attention import PackedCausal
from pixtral.processing import Processor
from pixtral.train.config import load_config
from pixtral.train.lora import load_lora
from pixtral.train.metrics import read_metrics
from pixtral.train import trainer
from pixtral.train.trainer import train

from .conftest import tiny_config, write_config

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def run_cli(cfg_path: Path, *extra: str, torchrun: int = 0, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [PY, "-m", "pixtral.cli.main", "train", "--config", str(cfg_path), *extra]
    if torchrun:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "pixtral.cli.main", "train", "--config", str(cfg_path), *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]  # not step 0's baseline


def test_a_few_steps_reduce_the_loss_and_save_both_layouts(tmp_path, chat_data):
    cfg = tiny_config(tmp_path / "run", chat_data, steps=12, eval_every=6, **{"data.val": [str(chat_data.parent / "val.jsonl")]})
    final = train(load_config(write_config(tmp_path / "c.yaml", cfg)), log=lambda *_: None)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = records[1]["loss"], records[-1]["loss"]
    assert last < first * 0.7, (first, last)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 6, 12]  # 0: the baseline before training
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    a = load_model(final / "mistral")
    b = load_model(final / "hf")
    proc = Processor.from_file(final / "mistral" / "tekken.json")
    ids, images = proc.encode_chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(chat_data.parent / "images" / "train0.png")}},
        {"type": "text", "text": "What color is the image?"}]}])
    ids = torch.tensor(ids)
    torch.testing.assert_close(a(ids, images), b(ids, images), rtol=0, atol=0)


def test_resume_after_kill_9_gives_the_same_losses(tmp_path, chat_data):
    steps = 40
    ref_cfg = write_config(tmp_path / "ref.yaml", tiny_config(tmp_path / "ref", chat_data, steps=steps))
    run_cli(ref_cfg)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", chat_data, steps=steps, save_every=3))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([PY, "-m", "pixtral.cli.main", "train", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "final").exists(), "the run finished before it could be killed"
    killed_at = len(losses(tmp_path / "run"))
    assert killed_at < steps
    run_cli(cfg, "--resume")
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")  # bit for bit


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path, chat_data, parallel):
    one = write_config(tmp_path / "one.yaml", tiny_config(tmp_path / "one", chat_data, steps=6, grad_accum=2))
    two = write_config(tmp_path / "two.yaml", tiny_config(tmp_path / "two", chat_data, steps=6, grad_accum=1,
                                                          parallel=parallel))
    run_cli(one)
    run_cli(two, torchrun=2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    assert (tmp_path / "two" / "final" / "hf" / "config.json").is_file()


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, chat_data):
    root = tmp_path_factory.mktemp("base")
    cfg = tiny_config(root / "run", chat_data, steps=4)
    return train(load_config(write_config(root / "c.yaml", cfg)), log=lambda *_: None) / "mistral"


def test_lora_trains_only_adapters_and_merges_to_the_same_logits(tmp_path, chat_data, base_checkpoint):
    cfg = tiny_config(tmp_path / "lora", chat_data, steps=6,
                      **{"model.init": str(base_checkpoint), "lora.enabled": True, "lora.rank": 4,
                         "lora.targets": ["wq", "wv", "w1"], "lora.adapter": True, "lora.vision_encoder": True,
                         "optim.lr": 1e-2})
    del cfg["model"]["args"], cfg["model"]["tokenizer_ranks"]
    final = train(load_config(write_config(tmp_path / "c.yaml", cfg)), log=lambda *_: None)
    base = load_file(str(base_checkpoint / "consolidated.safetensors"))
    state = torch.load(tmp_path / "lora" / "checkpoint.pt", weights_only=False)["model"]
    lora_keys = [k for k in state if ".lora_" in k]
    assert any(k.startswith("model.vision_language_adapter.") for k in lora_keys)
    assert any(k.startswith("model.vision_encoder.") for k in lora_keys)
    for key, value in state.items():
        if ".lora_" not in key:
            assert torch.equal(value, base[key.removeprefix("model.")]), key  # frozen base weights
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in state.items())

    merged = load_model(final / "mistral")
    with_adapters = load_model(base_checkpoint)
    load_lora(with_adapters, final / "lora")
    proc = Processor.from_file(final / "mistral" / "tekken.json")
    ids, images = proc.encode_chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(chat_data.parent / "images" / "train1.png")}},
        {"type": "text", "text": "What color is the image?"}]}])
    ids = torch.tensor(ids)
    expected = with_adapters(ids, images)
    assert not torch.allclose(expected, load_model(base_checkpoint)(ids, images), atol=1e-4)  # LoRA changed it
    torch.testing.assert_close(merged(ids, images), expected, rtol=1e-4, atol=1e-4)


def test_freeze_vision_encoder_and_adapter(tmp_path, chat_data, base_checkpoint):
    cfg = tiny_config(tmp_path / "frozen", chat_data, steps=3,
                      **{"model.init": str(base_checkpoint), "freeze": ["vision_encoder", "adapter"]})
    del cfg["model"]["args"], cfg["model"]["tokenizer_ranks"]
    final = train(load_config(write_config(tmp_path / "c.yaml", cfg)), log=lambda *_: None)
    before = load_file(str(base_checkpoint / "consolidated.safetensors"))
    after = load_file(str(final / "mistral" / "consolidated.safetensors"))
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same == key.startswith(("vision_encoder.", "vision_language_adapter.")), key


def test_packed_samples_do_not_see_each_other(chat_data):
    """The loss of a sample is the same alone or packed with others (positions restart)."""
    from pixtral.model import Pixtral
    from pixtral.train.trainer import LossModel, make_batch, model_args_from
    from pixtral.train.data import load_jsonl
    from pixtral.train.tokenizer import write_small_tekken

    cfg = load_config(None, [f"data.train={chat_data}", "model.tokenizer_ranks=300",
                             "model.args={dim: 32, n_layers: 1, head_dim: 16, hidden_dim: 32, n_heads: 2, n_kv_heads: 1,"
                             " vision: {hidden_size: 16, intermediate_size: 16, num_hidden_layers: 1,"
                             " num_attention_heads: 1, image_size: 64}}"])
    args = model_args_from(cfg)
    torch.manual_seed(0)
    model = LossModel(Pixtral(args))
    tok = write_small_tekken(300, chat_data.parent / "packed" / "tekken.json", args.vision)
    proc = Processor.from_file(tok)
    examples, _ = load_jsonl(chat_data, proc, 1000)
    packed = model(*make_batch(examples[:3], proc, "cpu"))[0]
    alone = sum(model(*make_batch([e], proc, "cpu"))[0] for e in examples[:3])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert isinstance(PackedCausal([2, 3]).positions, torch.Tensor)


def test_cpu_bf16_autocast_trains_in_bfloat16(tmp_path, chat_data, monkeypatch):
    """`cpu_bf16: true` runs the forward under bf16 autocast on the CPU (the default model's
    recipe); off, the same run stays float32. Both learn."""
    import torch.nn.functional as F

    seen = []
    real = F.linear

    def spy(x, weight, bias=None):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)  # whatever CPU runs the tests
    runs = {}
    for flag in (False, True):
        seen.clear()
        cfg = tiny_config(tmp_path / f"run{flag}", chat_data, steps=8, cpu_bf16=flag)
        train(load_config(write_config(tmp_path / f"c{flag}.yaml", cfg)), log=lambda *_: None)
        runs[flag] = losses(tmp_path / f"run{flag}")
        assert seen and all(s == flag for s in seen)
    for flag, curve in runs.items():
        assert curve[-1] < curve[0] * 0.8, (flag, curve)
    assert runs[True] != runs[False]


def test_cpu_bf16_falls_back_to_float32_without_native_bf16(tmp_path, chat_data, monkeypatch):
    """On a CPU that would emulate bf16, `cpu_bf16: true` says so and trains in float32."""
    import torch.nn.functional as F

    seen = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: seen.append(torch.is_autocast_enabled("cpu")) or real(x, w, b))
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    logged = []
    cfg = tiny_config(tmp_path / "run", chat_data, steps=2, cpu_bf16=True)
    train(load_config(write_config(tmp_path / "c.yaml", cfg)), log=logged.append)
    assert seen and not any(seen)
    assert any("cpu_bf16" in line and "no native bfloat16" in line and "float32" in line for line in logged)


def test_native_bf16_check_answers_on_this_machine():
    import platform

    answer = trainer.cpu_has_native_bf16()
    assert isinstance(answer, bool)
    if platform.machine() == "x86_64" and not torch.cpu._is_avx512_supported():
        assert answer is False  # no AVX512 at all, so no AVX512-BF16


def test_image_feature_l2_keeps_image_features_small(tmp_path, chat_data):
    """optim.image_feature_l2 adds the mean square of the adapter output to the training loss
    (not to validation): trained with it, image features end up much smaller."""
    from pixtral.processing import load_processor

    rms = {}
    for coef in (0.0, 1.0):
        cfg = tiny_config(tmp_path / f"run{coef}", chat_data, steps=12, **{"optim.image_feature_l2": coef,
                                                                           "optim.vision_lr_scale": 3.0})
        final = train(load_config(write_config(tmp_path / f"c{coef}.yaml", cfg)), log=lambda *_: None)
        model = load_model(final / "mistral")
        processor = load_processor(final / "mistral")
        _, images = processor.encode_chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(chat_data.parent / "images" / "train0.png")}},
            {"type": "text", "text": "?"}]}])
        with torch.no_grad():
            rms[coef] = model.encode_images(images).pow(2).mean().sqrt().item()
    assert rms[1.0] < 0.5 * rms[0.0], rms


def test_image_feature_l2_is_a_training_term_only(tmp_path, chat_data):
    from pixtral.model import preset
    from pixtral.model import Pixtral
    from pixtral.train.trainer import LossModel

    torch.manual_seed(0)
    model = Pixtral(preset("tiny"))
    plain, penalised = LossModel(model), LossModel(model, image_feature_l2=0.5)
    image = torch.randn(3, 32, 32)
    n = model.image_token_counts([image])[0]
    ids = torch.tensor([1] + [model.image_token_id] * n + [5, 6, 7])
    args = (ids, [image], [len(ids)], torch.tensor([n + 1, n + 2]), torch.tensor([6, 7]))
    features = model.encode_images([image])
    (ce, none), (ce_again, term) = plain(*args), penalised(*args)
    assert none == 0 and torch.equal(ce, ce_again)
    torch.testing.assert_close(term, 0.5 * 2 * features.pow(2).mean())
    penalised.eval()
    assert penalised(*args)[1] == 0
    # logged separately from the loss; a negative weight is refused
    cfg = tiny_config(tmp_path / "run", chat_data, steps=2, **{"optim.image_feature_l2": 0.1})
    train(load_config(write_config(tmp_path / "c.yaml", cfg)), log=lambda *_: None)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["image_feature_l2"] > 0 for r in records)
    from pixtral.errors import ConfigError

    with pytest.raises(ConfigError, match="image_feature_l2"):
        load_config(None, [f"data.train={chat_data}", "optim.image_feature_l2=-1"]).validate()


def test_learning_rates_of_the_encoder_and_the_rest_of_the_vision_path(chat_data):
    """optim.vision_lr_scale scales the whole vision path (encoder, patch merger, adapter);
    optim.encoder_lr_scale further scales the encoder and its pre-projector norm alone."""
    from pixtral.errors import ConfigError
    from pixtral.model import Pixtral
    from pixtral.model import preset
    from pixtral.train.trainer import param_groups

    model = Pixtral(preset("tiny"))
    cfg = load_config(None, [f"data.train={chat_data}", "optim.lr=1.0", "optim.vision_lr_scale=0.5",
                             "optim.encoder_lr_scale=0.2"])
    lr_of = {id(p): g["lr"] for g in param_groups(model, cfg) for p in g["params"]}
    seen = set()
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        expected = {"vision_encoder": 0.1, "pre_mm_projector_norm": 0.1, "patch_merger": 0.5,
                    "vision_language_adapter": 0.5}.get(part, 1.0)
        assert lr_of[id(p)] == pytest.approx(expected), name
        seen.add(expected)
    assert seen == {0.1, 0.5, 1.0}
    for bad in ("-1", ".nan"):
        with pytest.raises(ConfigError, match="encoder_lr_scale"):
            load_config(None, [f"data.train={chat_data}", f"optim.encoder_lr_scale={bad}"]).validate()


def test_centering_encoder_init_subtracts_each_images_mean_token():
    """`model.centering_encoder_init` starts the vision transformer as `x - mean(x)` over each image
    (attention kept inside each image), where x is `ln_pre` of the patch embeddings: a page's
    background then embeds near zero whatever its colour, and only what is drawn stands out."""
    from pixtral.model import Pixtral
    from pixtral.model import preset
    from pixtral.train.trainer import init_weights

    torch.manual_seed(0)
    model = Pixtral(preset("tiny"))
    init_weights(model, centering_encoder=True)
    encoder = model.vision_encoder
    p = encoder.args.patch_size
    page = torch.full((3, 3 * p, 4 * p), 1.5)
    page[:, 4:12, 6:9] = -1.0  # a stroke in the first patch
    other = torch.randn(3, 2 * p, 2 * p)
    with torch.no_grad():
        out, grids = encoder([page, other])
        x = encoder.ln_pre(encoder.patchify([page, other]))
    assert grids == [(3, 4), (2, 2)]
    first, second = x[:12], x[12:]
    expected = torch.cat([first - first.mean(0), second - second.mean(0)])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # the blank patches of the page are all alike: they embed to one small vector, the stroke does not
    blank_norm = out[1:12].norm(dim=-1).max().item()
    assert out[0].norm().item() > 5 * blank_norm
    # without the option the encoder is random: no centering
    torch.manual_seed(0)
    plain = Pixtral(preset("tiny"))
    init_weights(plain)
    with torch.no_grad():
        out_plain, _ = plain.vision_encoder([page, other])
    assert (out_plain[:12].mean(0).norm() > 0.1 * out_plain[:12].norm(dim=-1).mean()).item()


def test_frozen_zero_branches_are_skipped_with_the_same_features_and_gradients():
    """With the centering start frozen, five of the encoder's six residual branches have all-zero
    output projections: `skip_zero_branches` leaves them out, and the features, and the gradients that
    reach the patch merger and adapter, are bit for bit those of computing every branch. A branch
    that trains, or a non-zero one, is never skipped."""
    from pixtral.model import Pixtral
    from pixtral.model import preset
    from pixtral.train.trainer import freeze, init_weights
    from pixtral.train.zero_branches import WithoutAttention, WithoutBranches, WithoutFeedForward, skip_zero_branches

    torch.manual_seed(0)
    model = Pixtral(preset("tiny"))
    init_weights(model, centering_encoder=True)
    images = [torch.randn(3, 48, 64), torch.randn(3, 32, 32)]

    def run():
        model.zero_grad(set_to_none=True)
        features = model.encode_images(images)
        features.square().sum().backward()
        return features.detach(), model.vision_language_adapter.w_in.weight.grad.clone()

    assert skip_zero_branches(model) == 0  # everything trains: nothing is skipped
    reference = run()
    freeze(model, ["vision_encoder"])
    layers = model.vision_encoder.transformer.layers
    assert skip_zero_branches(model) == 2 * len(layers) - 1
    assert type(layers[0]) is WithoutFeedForward  # the averaging attention stays
    assert all(type(b) is WithoutBranches for b in layers[1:])
    with torch.no_grad():  # a branch left out is not computed at all: NaNs in it change nothing
        layers[1].attention.wq.weight.fill_(float("nan"))
    skipped = run()
    assert torch.equal(skipped[0], reference[0]) and torch.equal(skipped[1], reference[1])
    assert set(model.state_dict()) == set(Pixtral(preset("tiny")).state_dict())  # saving is unchanged
    with torch.no_grad():
        layers[1].feed_forward.w2.weight[0, 0] = 1e-3  # no longer zero
    assert skip_zero_branches(model) == 2 * len(layers) - 2 and type(layers[1]) is WithoutAttention


def test_final_save_keeps_the_mistral_layout_when_hf_cannot_hold_the_model(tmp_path):
    """A patch merger without its pre-projector norm has no transformers class: the trainer's final
    save writes the Mistral layout, says why the HF one is missing, and does not fail the run."""
    import dataclasses

    from pixtral.model import Pixtral
    from pixtral.model import preset
    from pixtral.train.config import TrainConfig
    from pixtral.train.trainer import save_final

    args = preset("tiny")
    args.vision = dataclasses.replace(args.vision, spatial_merge_size=2, mm_projector_id="patch_merge",
                                      add_pre_mm_projector_layer_norm=False)
    model = Pixtral(args)
    logs: list[str] = []
    save_final(model.state_dict(), args, TrainConfig(), tmp_path / "final", None, logs.append)
    assert torch.equal(load_model(tmp_path / "final" / "mistral").patch_merger.merging_layer.weight,
                       model.patch_merger.merging_layer.weight)
    assert not (tmp_path / "final" / "hf").exists()
    assert len(logs) == 1 and "not in the Hugging Face layout" in logs[0] and "add_pre_mm_projector_layer_norm" in logs[0]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """The recipes in configs/ parse with no unknown key and pass validation (their data files are
    made by the commands in their comments, so only the settings are checked here)."""
    cfg = load_config(path)
    cfg.validate()
    assert cfg.steps > 0 and cfg.data.train


def test_from_scratch_settings_are_refused_with_a_checkpoint_init(chat_data):
    """A checkpoint brings its own architecture and weights: architecture overrides or init options
    given with one would be silently ignored, so the config is refused and the keys are named."""
    base = [f"data.train={chat_data}", "model.init=some/checkpoint"]
    load_config(None, base).validate()
    for extra, key in (("model.args.dim=64", "model.args"), ("model.tokenizer_ranks=300", "model.tokenizer_ranks"),
                       ("model.centering_encoder_init=true", "model.centering_encoder_init")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*only apply from scratch"):
            load_config(None, base + [extra]).validate()
