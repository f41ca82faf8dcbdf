"""Packing several images in one pass is the same as encoding each alone, without a dense mask."""

import torch
import torch.nn.functional as F

from pixtral.model import Pixtral, preset
from tests.conftest import random_model


def test_packed_images_equal_separate_encoding():
    model = random_model("tiny", std=0.1)
    torch.manual_seed(0)
    images = [torch.randn(3, 32, 80), torch.randn(3, 48, 16), torch.randn(3, 32, 80), torch.randn(3, 16, 16)]
    packed = model.encode_images(images)
    separate = torch.cat([model.encode_images([img]) for img in images])
    assert packed.shape == (2 * 5 + 3 * 1 + 2 * 5 + 1, model.args.dim)
    assert torch.allclose(packed, separate, atol=1e-5)


def test_no_mask_over_all_patches(monkeypatch):
    """Attention calls only ever see one image's patches (same-size runs batched), never a mask."""
    model = random_model("tiny", std=0.1)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    images = [torch.randn(3, 32, 32), torch.randn(3, 32, 32), torch.randn(3, 64, 16)]
    model.vision_encoder(images)
    assert calls and all(mask is None for _, mask in calls)
    seq_lens = {shape[-2] for shape, _ in calls}
    assert seq_lens == {4}  # 2x2 patches per image; the 4x1 image also has 4 tokens
    assert {shape[0] for shape, _ in calls} <= {1, 2, 3}


def test_patchify_equals_conv():
    model = random_model("tiny", std=0.1)
    img = torch.randn(3, 48, 32)
    conv = model.vision_encoder.patch_conv(img[None])[0]  # [C, 3, 2]
    flat = model.vision_encoder.patchify([img])
    assert torch.allclose(flat, conv.flatten(1).t(), atol=1e-5)


def test_image_limits_are_clear_errors():
    model = Pixtral(preset("tiny"))
    import pytest

    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        model.encode_images([torch.randn(3, 20, 16)])
    with pytest.raises(ValueError, match="limit of 64 per side"):
        model.encode_images([torch.randn(3, 16, 16 * 65)])
    with pytest.raises(ValueError, match="2 \\[IMG\\] tokens but the images give 1"):
        model(torch.tensor([1, 10, 10, 4]), [torch.randn(3, 16, 16)])
