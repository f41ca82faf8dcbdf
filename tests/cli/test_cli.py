"""The command line as users run it: real processes, real files."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

PIXTRAL = [sys.executable, "-m", "pixtral.cli.main"]


def run(*args, input=None, timeout=120):
    return subprocess.run([*PIXTRAL, *args], capture_output=True, text=True, input=input, timeout=timeout)


def test_help_is_useful():
    out = run("--help")
    assert out.returncode == 0
    for command in ("chat", "convert", "init"):
        assert command in out.stdout
    chat_help = run("chat", "--help").stdout
    assert "--image" in chat_help and "examples:" in chat_help


def test_init_then_chat_with_image(tmp_path):
    ckpt = tmp_path / "tiny"
    assert run("init", "--preset", "tiny", "--out", str(ckpt)).returncode == 0
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 32), "green").save(img)
    out = run("chat", "--model", str(ckpt), "--image", str(img), "--max-tokens", "5", "What is it?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_interactive_chat_reads_stdin(tmp_path):
    ckpt = tmp_path / "tiny"
    run("init", "--out", str(ckpt))
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(img)
    out = run("chat", "--model", str(ckpt), "--max-tokens", "3", input=f"hello\n/image {img}\nwhat?\n/image nope.png\n/quit\n")
    assert out.returncode == 0, out.stderr
    assert "image attached" in out.stdout
    assert "nope.png: image file not found" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["chat", "--model", "/does/not/exist", "hi"], "/does/not/exist: no such checkpoint directory"),
    (["chat", "--model", ".", "--image", "missing.png", "hi"], "missing.png: image file not found"),
    (["convert", "/does/not/exist", "/tmp/x", "--to", "hf"], "no such checkpoint directory"),
])
def test_errors_are_one_line_without_traceback(args, message):
    out = run(*args)
    assert out.returncode == 1
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("command, hidden, extra", [
    (["serve"], "fastapi", "server"),
    (["eval", "synth", "--data", "x"], "openai", "eval"),
    (["data", "synth", "--out", "x", "--n", "1"], "tqdm", "train"),
    (["train", "--config", "x.yaml"], "yaml", "train"),
])
def test_a_missing_optional_dependency_names_its_extra(command, hidden, extra):
    # A Python that cannot import one of the extra's packages (as on a core-only install).
    code = (f"import sys; sys.modules[{hidden!r}] = None; from pixtral.cli.main import main; "
            f"sys.exit(main({command!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"pip install 'pixtral[{extra}]'" in out.stderr and hidden in out.stderr


def test_chat_quantized_on_load_answers_as_the_quantized_engine():
    """`pixtral chat --quantization int8` on the default model: the answer of `LLM(quantization="int8")`."""
    from pathlib import Path

    from pixtral.engine import LLM
    from pixtral.generation import SamplingParams

    chart = Path(__file__).resolve().parents[2] / "examples" / "chart.png"
    question = "What is the value of bar G?"  # the README's
    llm = LLM(quantization="int8")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(chart)}, {"type": "text", "text": question}]}]
    expected = llm.chat([messages], SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text
    out = run("chat", "--quantization", "int8", "--image", str(chart), "--max-tokens", "32", question)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected.strip() and expected.strip()
    refused = run("chat", "--quantization", "int4", "hi")
    assert refused.returncode == 2 and "--quantization/-q: invalid choice: 'int4'" in refused.stderr
