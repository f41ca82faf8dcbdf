"""`pixtral chat` and `pixtral eval --model` with `--tensor-parallel-size 2` (the command spawns its
worker), and `pixtral chat` launched by torchrun on one machine (2 CPU processes, rank 0 drives
rank 1): the same greedy answers as one process, every process gone at the end.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # the shared tiny model builder
from tiny_model import build_checkpoint, image_uri  # noqa: E402

from pixtral.checkpoint import load_model  # noqa: E402
from pixtral.generation import SamplingParams, chat  # noqa: E402
from pixtral.processing import load_processor  # noqa: E402

PIXTRAL = [sys.executable, "-m", "pixtral.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUESTION = "What is in this picture, and why?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tp_cli") / "tiny")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp_cli_image") / "picture.png"
    path.write_bytes(base64.b64decode(image_uri(3).split(",", 1)[1]))
    return path


@pytest.fixture(scope="module")
def expected(checkpoint, picture) -> str:
    """What one process answers (the plain generation loop, as `pixtral chat` without the option)."""
    torch.set_num_threads(1)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(picture)}},
                                             {"type": "text", "text": QUESTION}]}]
    return chat(load_model(checkpoint), load_processor(checkpoint), messages,
                SamplingParams(temperature=0, max_tokens=10)).text


def test_pixtral_chat_over_two_ranks(checkpoint, picture, expected):
    out = subprocess.run([*PIXTRAL, "chat", "--model", str(checkpoint), "--image", str(picture), "--max-tokens", "10",
                          "--tensor-parallel-size", "2", QUESTION], capture_output=True, text=True, env=ENV,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == expected + "\n"


def test_pixtral_chat_under_torchrun(checkpoint, picture, expected):
    """The multi-node launch, on one node: torchrun starts both ranks; rank 0 runs the command and
    drives rank 1, which serves as a worker until rank 0 is done; both exit 0."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", "-m", "pixtral.cli.main", "chat", "--model", str(checkpoint),
                          "--image", str(picture), "--max-tokens", "10", QUESTION],
                         capture_output=True, text=True, env=ENV, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == expected + "\n"  # rank 0 answers; rank 1 prints nothing


def test_pixtral_eval_model_over_two_ranks(checkpoint, tmp_path):
    from pixtral.cli.main import main
    from pixtral.data.synth import SynthConfig, write_dataset

    data = tmp_path / "data"
    write_dataset(SynthConfig(out=data, n=60, seed=5), progress=False)
    common = ["eval", "synth", "--data", str(data), "--model", str(checkpoint), "--no-progress", "--max-tokens", "6",
              "--limit", "3"]
    assert main([*common, "--output-dir", str(tmp_path / "one")]) == 0  # in this process
    out = subprocess.run([*PIXTRAL, *common, "--output-dir", str(tmp_path / "two"), "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, env=ENV, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]

    def answers(run: str) -> dict:
        rows = [json.loads(line) for line in (tmp_path / run / "synth.items.jsonl").read_text().splitlines()]
        return {r["id"]: (r["status"], r["answer"]) for r in rows}

    one, two = answers("one"), answers("two")
    assert len(one) >= 3 and one == two
    assert json.loads((tmp_path / "two" / "synth.json").read_text())["settings"]["model"]["tensor_parallel_size"] == 2


def test_an_endpoint_takes_no_tensor_parallel_size(tmp_path):
    out = subprocess.run([*PIXTRAL, "eval", "synth", "--data", str(tmp_path), "--endpoint", "http://127.0.0.1:9/v1",
                          "--served-model", "x", "--tensor-parallel-size", "2"], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert out.returncode == 1 and "--tensor-parallel-size is for a local --model" in out.stderr
