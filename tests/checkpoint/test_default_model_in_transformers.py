"""The embedded default model converts to the Hugging Face layout that transformers itself loads
(Mistral3: the patch merger and the norm before it), with the same logits as ours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixtral.assets import DEFAULT_MODEL_DIR
from pixtral.checkpoint import convert_checkpoint, load_model
from pixtral.processing import load_processor

REPO = Path(__file__).resolve().parents[2]


def test_default_model_runs_in_transformers_with_our_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_dir = convert_checkpoint(DEFAULT_MODEL_DIR, tmp_path / "hf", to="hf")
    hf = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Mistral3ForConditionalGeneration"
    ours = load_model(DEFAULT_MODEL_DIR)
    processor = load_processor(hf_dir)  # the converted folder carries the tokenizer too
    ids, images = processor.encode_chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(REPO / "examples" / "table.png")}},
        {"type": "text", "text": "What is the value for Jam in column C?"}]}])
    with torch.no_grad():
        expected = ours(torch.tensor(ids), images)
        got = hf(input_ids=torch.tensor([ids]), pixel_values=images[0][None],
                 image_sizes=torch.tensor([list(images[0].shape[1:])])).logits[0]
    assert expected.abs().max() > 1.0  # real logits, not a degenerate output
    # float32 in both, different operation order: agreement to 1e-4 of the logits' size
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
