"""The embedded default model: present, small, loadable, and it answers with its own tokenizer."""

from __future__ import annotations

from pixtral.assets import DEFAULT_MODEL_DIR
from pixtral.checkpoint import load_model
from pixtral.generation import SamplingParams, chat
from pixtral.processing import load_processor

from .test_train import REPO


def test_files_and_size():
    names = sorted(p.name for p in DEFAULT_MODEL_DIR.iterdir() if not p.name.startswith("."))
    assert names == ["consolidated.safetensors", "params.json", "tekken.json"]
    assert sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()) <= 30 * 2**20


def test_loads_and_answers_about_an_example_image():
    model = load_model(DEFAULT_MODEL_DIR)
    processor = load_processor()
    assert processor.vocab_size == model.args.vocab_size
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(REPO / "examples" / "chart.png")}},
        {"type": "text", "text": "What is the value of bar G?"}]}]
    out = chat(model, processor, messages, SamplingParams(temperature=0, max_tokens=8))
    # The README's first command asks this; examples/README.md gives the answer.
    assert out.text.strip() == "4" and out.finish_reason == "stop"
