"""What a fine-tuning user relies on: resume semantics, the best checkpoint and early stopping,
starting from the built-in model, export from the run folder alone, and ordinary file modes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from pixtral.checkpoint.save import current_umask
from pixtral.errors import ConfigError
from pixtral.train.config import load_config
from pixtral.train.metrics import read_metrics
from pixtral.train.trainer import export_checkpoint, train

from .conftest import tiny_config, write_config
from .test_train import PY, REPO, run_cli


def test_resume_with_changed_hyperparameters_follows_them_from_the_resumed_step(tmp_path, chat_data):
    """Resumed with another learning rate, more steps and weight decay, the run logs the learning
    rates of a fresh run with those settings from step 5 on, says what changed, and its optimizer
    uses the new weight decay; the first 4 steps stay as they were."""
    run = tmp_path / "run"
    train(load_config(write_config(tmp_path / "a.yaml", tiny_config(run, chat_data, steps=4))), log=lambda *_: None)
    before = read_metrics(run / "metrics.jsonl")
    logs: list[str] = []
    changed = tiny_config(run, chat_data, steps=8, **{"optim.lr": 2e-2, "optim.weight_decay": 0.1})
    train(load_config(write_config(tmp_path / "b.yaml", changed)), resume=True, log=logs.append)
    fresh = tiny_config(tmp_path / "fresh", chat_data, steps=8, **{"optim.lr": 2e-2})
    train(load_config(write_config(tmp_path / "c.yaml", fresh)), log=lambda *_: None)

    resumed, reference = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "fresh" / "metrics.jsonl")
    assert resumed[:4] == before
    assert [r["lr"] for r in resumed[4:]] == [r["lr"] for r in reference[4:]]
    assert [r["lr"] for r in resumed[4:]] != [r["lr"] for r in before]
    said = [line for line in logs if line.startswith("changed since the checkpoint, in effect from step 5: ")]
    assert len(said) == 1 and "optim.lr 0.01 -> 0.02" in said[0] and "steps 4 -> 8" in said[0], logs
    groups = torch.load(run / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
    assert sorted({g["weight_decay"] for g in groups}) == [0.0, 0.1]


def test_resume_refuses_what_it_cannot_change_and_a_finished_run(tmp_path, chat_data):
    """Also with the config of an older checkpoint, which holds removed options as false."""
    cfg = write_config(tmp_path / "a.yaml", tiny_config(tmp_path / "run", chat_data, steps=2))
    train(load_config(cfg), log=lambda *_: None)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    state["config"]["model"].update(blank_patch_init=False, local_encoder_init=False)
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match=r"--resume: data\.seq_len, seed differ from the config of .*checkpoint\.pt"):
        train(load_config(cfg, ["seed=1", "data.seq_len=96", "steps=4"]), resume=True, log=lambda *_: None)
    tokenizer = (tmp_path / "run" / "tekken.json").read_bytes()
    with pytest.raises(ConfigError, match=r"--resume: lora\.enabled, model\.tokenizer_ranks differ"):
        train(load_config(cfg, ["lora.enabled=true", "model.tokenizer_ranks=200", "steps=4"]), resume=True,
              log=lambda *_: None)
    assert (tmp_path / "run" / "tekken.json").read_bytes() == tokenizer  # refused before anything was written
    with pytest.raises(ConfigError, match=r"is at step 2 and steps is 2: nothing left to train; raise steps"):
        train(load_config(cfg), resume=True, log=lambda *_: None)
    dst, step = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    assert step == 2 and (dst / "mistral" / "consolidated.safetensors").is_file()
    state["config"]["model"]["local_encoder_init"] = True
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match=r"checkpoint\.pt: model\.local_encoder_init: this option was removed"):
        export_checkpoint(tmp_path / "run", tmp_path / "exported2")


def purple_val(chat_data) -> str:
    """The validation chats with every answer "purple", a word training never asks for: as the
    model learns the colours, its loss on these first falls (the answer format) and then rises."""
    lines = []
    for line in (chat_data.parent / "val.jsonl").read_text().splitlines():
        record = json.loads(line)
        for m in record["messages"]:
            if m["role"] == "assistant":
                m["content"] = "purple"
        lines.append(json.dumps(record))
    path = chat_data.parent / "purple.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_keeps_the_best_step_and_stops_early_when_validation_loss_rises(tmp_path, chat_data):
    run = tmp_path / "run"
    cfg = tiny_config(run, chat_data, steps=40, eval_every=2, early_stop_after=2, save_every=4,
                      **{"data.val": [purple_val(chat_data)]})
    logs: list[str] = []
    final = train(load_config(write_config(tmp_path / "c.yaml", cfg)), log=logs.append)
    records = read_metrics(run / "metrics.jsonl")
    checks = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    best_step = min(checks, key=lambda c: c[1])[0]
    assert 0 < best_step < checks[-1][0], checks  # a best in the middle: the test means something
    assert checks[-1][0] == best_step + 2 * 2 and records[-1]["step"] == checks[-1][0] < 40
    said = f"early stop at step {best_step + 4}: 2 validations without a new best"
    assert any(line.startswith(said) for line in logs), logs
    info = json.loads((final / "export.json").read_text())
    assert info["step"] == best_step and info["chosen"] == "the lowest validation loss"
    assert sorted(p.name for p in run.glob("best-*.pt")) == [f"best-{best_step}.pt"]
    best = torch.load(run / f"best-{best_step}.pt", weights_only=True)["model"]
    last = torch.load(run / "checkpoint.pt", weights_only=False)
    assert last["step"] == best_step + 4
    exported = load_file(str(final / "mistral" / "consolidated.safetensors"))
    for key, value in exported.items():
        assert torch.equal(value, best["model." + key]), key
    assert not all(torch.equal(v, last["model"]["model." + k]) for k, v in exported.items())


def test_lora_on_the_default_model_export_from_the_run_folder_and_file_modes(tmp_path, chat_data):
    """`model.init: default` fine-tunes the model shipped in the package; `--export DST --run DIR`
    needs no config; what the run writes has the modes the umask gives."""
    run = tmp_path / "run"
    cfg = {"out_dir": str(run), "model": {"init": "default"}, "lora": {"enabled": True, "rank": 4},
           "data": {"train": [str(chat_data)], "seq_len": 256}, "steps": 2, "save_every": 0, "eval_every": 0,
           "progress": False}
    run_cli(write_config(tmp_path / "c.yaml", cfg))
    final = run / "final"
    assert json.loads((final / "export.json").read_text()) == {"step": 2, "chosen": "the last step"}
    assert (final / "lora" / "adapter.safetensors").is_file()
    dirs = [final, final / "mistral", final / "hf", final / "lora"]
    files = [final / "lora" / "adapter.safetensors", final / "mistral" / "consolidated.safetensors",
             run / "checkpoint.pt"]
    mask = current_umask()
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {oct(0o777 & ~mask)}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    export = ["train", "--export", str(tmp_path / "exported"), "--run", str(run)]
    out = subprocess.run([PY, "-m", "pixtral.cli.main", *export], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"saved the model of step 2 of {run}" in out.stdout
    exported = load_file(str(tmp_path / "exported" / "mistral" / "consolidated.safetensors"))
    trained = load_file(str(final / "mistral" / "consolidated.safetensors"))
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_no_config_is_an_error_that_shows_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([PY, "-m", "pixtral.cli.main", "train"], env=env, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "pixtral train needs --config FILE" in out.stderr and "model: {init: default}" in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing started
