"""A tiny chat data set (coloured squares) and a tiny training config, for fast CPU runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "black": (0, 0, 0)}


def write_chat_data(root: Path, n: int, seed: int = 0, name: str = "train.jsonl") -> Path:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        color = rng.choice(list(COLORS))
        w, h = rng.choice([16, 32, 48]), rng.choice([16, 32])
        img = f"images/{name[:-6]}{i}.png"
        Image.new("RGB", (w, h), COLORS[color]).save(root / img)
        messages = [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                         {"type": "text", "text": "What color is the image?"}]},
            {"role": "assistant", "content": color},
        ]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "How wide is it?"}, {"role": "assistant", "content": str(w)}]
        lines.append(json.dumps({"messages": messages}))
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(out_dir: Path, train: Path, **extra) -> dict:
    cfg = {
        "out_dir": str(out_dir),
        "model": {
            "init": "preset:tiny",
            "tokenizer_ranks": 300,
            "args": {"dim": 32, "n_layers": 2, "head_dim": 16, "hidden_dim": 64, "n_heads": 2, "n_kv_heads": 1,
                     "vision": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                "num_attention_heads": 1, "image_size": 64, "patch_size": 16}},
        },
        "data": {"train": [str(train)], "seq_len": 128},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "steps": 8,
        "micro_batch_size": 1,
        "grad_accum": 2,
        "save_every": 0,
        "eval_every": 0,
        "log_every": 100,
        "progress": False,
    }
    for key, value in extra.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    write_chat_data(root, 40, seed=0)
    write_chat_data(root, 8, seed=1, name="val.jsonl")
    return root / "train.jsonl"
