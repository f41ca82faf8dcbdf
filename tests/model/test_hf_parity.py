"""Logits parity with Hugging Face transformers on identical random weights (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from pixtral.checkpoint import load_model, save_model
from tests.conftest import random_model

transformers = pytest.importorskip("transformers")

LAYOUTS = {
    "tiny": "LlavaForConditionalGeneration",          # Pixtral-12B layout
    "tiny-small-3.1": "Mistral3ForConditionalGeneration",  # pre-norm + 2x2 patch merger, patch 14
}
IMG, BREAK, END = 10, 12, 13


def prompt_with_images(grids: list[tuple[int, int]], text: list[int]) -> list[int]:
    ids = [1, 3]
    for h, w in grids:
        block = ([IMG] * w + [BREAK]) * h
        block[-1] = END
        ids += block + text
    return ids + ([4] if not grids else []) + [4]


CASES = {
    "text_only": [],
    "one_image": [(3, 5)],
    "three_images": [(2, 7), (6, 2), (4, 4)],  # different sizes and aspect ratios in one prompt
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def models(request, tmp_path_factory):
    name = request.param
    ours = random_model(name, seed=1, std=0.1)
    root = tmp_path_factory.mktemp(name)
    hf_dir = save_model(ours, root / "hf", layout="hf")
    mistral_dir = save_model(ours, root / "mistral", layout="mistral")
    cls = getattr(transformers, LAYOUTS[name])
    hf = cls.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return name, ours, hf, hf_dir, mistral_dir


def test_hf_config_values(models):
    name, ours, hf, hf_dir, _ = models
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == [LAYOUTS[name]]
    assert hf.config.vision_config.hidden_act == "silu"
    assert hf.config.vision_feature_layer == -1
    assert hf.config.image_token_index == IMG
    assert hf.config.text_config.head_dim == ours.args.head_dim
    assert hf.config.text_config.tie_word_embeddings is False
    text_rope = hf.config.text_config.rope_parameters["rope_theta"] if hasattr(hf.config.text_config, "rope_parameters") else hf.config.text_config.rope_theta
    assert text_rope == ours.args.rope_theta


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(models, case):
    name, ours, hf, hf_dir, mistral_dir = models
    v = ours.args.vision
    unit = v.patch_size * v.spatial_merge_size  # pixels per image token
    grids = CASES[case]
    torch.manual_seed(2)
    images = [torch.randn(3, h * unit, w * unit) for h, w in grids]
    ids = torch.tensor(prompt_with_images(grids, [5847, 13089, 1278]))

    with torch.no_grad():
        expected = _hf_logits(hf, ids, images)
    got = ours(ids, images)
    assert got.shape == (len(ids), ours.args.vocab_size)
    assert expected.abs().max() > 1.0, "logits too small for a meaningful comparison"
    print(f"max |logit| {expected.abs().max():.2f}, max diff {(got - expected).abs().max():.2e}")
    assert (got - expected).abs().max().item() <= 1e-4

    # The same weights through either on-disk layout give the same logits.
    for path in (mistral_dir, hf_dir):
        loaded = load_model(path, dtype=torch.float32)
        assert (loaded(ids, images) - got).abs().max().item() <= 1e-5


def test_image_order_matters(models):
    """Guard against a parity test that cannot fail: swapping two images changes the logits."""
    name, ours, *_ = models
    v = ours.args.vision
    unit = v.patch_size * v.spatial_merge_size
    torch.manual_seed(3)
    a, b = torch.randn(3, 2 * unit, 2 * unit), torch.randn(3, 2 * unit, 2 * unit)
    ids = torch.tensor(prompt_with_images([(2, 2), (2, 2)], [500]))
    assert (ours(ids, [a, b]) - ours(ids, [b, a])).abs().max() > 1e-2


def _hf_logits(hf, ids: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
    if not images:
        return hf(input_ids=ids[None]).logits[0]
    # HF takes a zero-padded batch plus each image's true size.
    height = max(img.shape[1] for img in images)
    width = max(img.shape[2] for img in images)
    pixels = torch.zeros(len(images), 3, height, width)
    for i, img in enumerate(images):
        pixels[i, :, : img.shape[1], : img.shape[2]] = img
    sizes = torch.tensor([[img.shape[1], img.shape[2]] for img in images])
    return hf(input_ids=ids[None], pixel_values=pixels, image_sizes=sizes).logits[0]
