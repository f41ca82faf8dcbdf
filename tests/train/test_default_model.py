"""The embedded default model: present, small, loadable, and it answers with its own tokenizer."""

from __future__ import annotations

import re

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


def example_questions() -> list[tuple[str, str, str]]:
    """(image file, question, answer) for every row of examples/README.md's table."""
    rows, image = [], None
    for line in (REPO / "examples" / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != 4 or cells[0] == "File":
            continue
        if cells[0]:
            image = re.search(r"`(.+?)`", cells[0]).group(1)
        rows.append((image, cells[2], cells[3]))
    return rows


def test_answers_every_example_question_as_examples_readme_says():
    """examples/README.md lists questions that the shipped model answers right (greedy), each asked
    on its own about its image."""
    rows = example_questions()
    assert len(rows) >= 10 and {image for image, _, _ in rows} == {p.name for p in (REPO / "examples").glob("*.png")}
    model, processor = load_model(DEFAULT_MODEL_DIR), load_processor()
    for image, question, answer in rows:
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(REPO / "examples" / image)}},
            {"type": "text", "text": question}]}]
        out = chat(model, processor, messages, SamplingParams(temperature=0, max_tokens=8))
        assert out.text.strip() == answer, (image, question, out.text)
