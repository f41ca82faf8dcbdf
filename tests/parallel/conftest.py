"""Small random checkpoints for tensor-parallel tests, written with the repo's own `save_model`.

Four shapes, covering both layouts and both ways of splitting KV heads at size 2:

| name | layout | n_heads / n_kv_heads | vision at tp 2 | adapter at tp 2 |
|---|---|---|---|---|
| `mistral_kv2` | Mistral | 4 / 2 (1 per rank) | sharded (2 heads) | sharded, biases |
| `mistral_kv1` | Mistral | 4 / 1 (replicated) | replicated (intermediate 63) | replicated (dim 65) |
| `hf_kv2` | HF (LLaVA) | 4 / 2 | sharded | sharded, biases |
| `hf_kv1_merge` | HF (Mistral3) | 4 / 1 (replicated) | replicated (1 head), patch merger | sharded |
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixtral.checkpoint import save_model
from pixtral.model import ModelArgs, Pixtral, VisionArgs

VOCAB = 256
IMG = 10  # the [IMG] token id of every config here


def tp_args(name: str) -> ModelArgs:
    base = dict(n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, vocab_size=VOCAB, rope_theta=1e6, max_seq_len=512)
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=256)
    if name == "mistral_kv2":
        return ModelArgs(dim=64, n_kv_heads=2, **base, vision=VisionArgs(**vis))
    if name == "mistral_kv1":
        # dim 65: the adapter cannot split over 2 ranks (replicated); intermediate 63: neither can
        # the encoder, so each rank encodes a share of the images.
        return ModelArgs(dim=65, n_kv_heads=1, **base,
                         vision=VisionArgs(**{**vis, "intermediate_size": 63}, adapter_bias=True))
    if name == "hf_kv2":
        return ModelArgs(dim=64, n_kv_heads=2, **base, vision=VisionArgs(**vis))
    if name == "hf_kv1_merge":
        return ModelArgs(dim=64, n_kv_heads=1, **base, vision=VisionArgs(
            **{**vis, "num_attention_heads": 1}, patch_size=14, adapter_bias=False, spatial_merge_size=2,
            add_pre_mm_projector_layer_norm=True, mm_projector_id="patch_merge"))
    raise KeyError(name)


CHECKPOINTS = ("mistral_kv2", "mistral_kv1", "hf_kv2", "hf_kv1_merge")


def random_pixtral(args: ModelArgs, seed: int = 0) -> Pixtral:
    """Weights drawn wide enough that the logits spread over several units (see tests/conftest.py)."""
    torch.manual_seed(seed)
    model = Pixtral(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model.requires_grad_(False)


def layout_of(name: str) -> str:
    return "hf" if name.startswith("hf") else "mistral"


@pytest.fixture(scope="session")
def tp_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp_ckpts")
    return {name: save_model(random_pixtral(tp_args(name), seed=i), root / name, layout=layout_of(name))
            for i, name in enumerate(CHECKPOINTS)}


def prompts(args: ModelArgs, seed: int = 0) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
    """A text prompt and a prompt with three images of different sizes: name -> (ids, images)."""
    g = torch.Generator().manual_seed(seed)
    v = args.vision
    p = v.patch_size * v.spatial_merge_size
    images = [torch.randn(3, h * p, w * p, generator=g) for h, w in ((1, 2), (2, 2), (3, 1))]
    counts = [(im.shape[1] // v.patch_size // v.spatial_merge_size) * (im.shape[2] // v.patch_size // v.spatial_merge_size)
              for im in images]

    def text(n: int) -> list[int]:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        return [t if t != IMG else IMG + 1 for t in ids]

    ids = text(3)
    for c in counts:
        ids += [IMG] * c + text(2)
    return {
        "text": (torch.tensor(text(17)), []),
        "images": (torch.tensor(ids), images),
    }
