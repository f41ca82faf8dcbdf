"""A reduced-vocabulary Tekken tokenizer for small models trained from scratch.

It is mistral-common's shipped Pixtral tokenizer (v3 Tekken) cut to its first `n_ranks`
BPE merges: the 1000 special ids are unchanged, the 256 byte tokens come first in the
ranking, so any text still encodes (rarer words take more tokens). The vocabulary is
1000 + n_ranks ids, and the embedding tables shrink accordingly.
"""

from __future__ import annotations

import json
from pathlib import Path

from pixtral.errors import ConfigError
from pixtral.processing.loading import SHIPPED_TEKKEN


def small_tekken(n_ranks: int, vision=None) -> dict:
    """The tokenizer JSON: the first `n_ranks` merges, image block from `vision` (VisionArgs)."""
    data = json.loads(SHIPPED_TEKKEN.read_text(encoding="utf-8"))
    cfg = data["config"]
    if not 256 <= n_ranks <= cfg["default_vocab_size"] - cfg["default_num_special_tokens"]:
        raise ConfigError(f"tokenizer ranks must be between 256 and the full vocabulary, got {n_ranks}")
    data["vocab"] = data["vocab"][:n_ranks]
    cfg["num_vocab_tokens"] = n_ranks
    cfg["default_vocab_size"] = cfg["default_num_special_tokens"] + n_ranks
    if vision is not None:
        data["image"] = {
            "image_patch_size": vision.patch_size,
            "max_image_size": vision.image_size,
            "spatial_merge_size": vision.spatial_merge_size,
        }
    return data


def write_small_tekken(n_ranks: int, dst: str | Path, vision=None) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(small_tekken(n_ranks, vision), ensure_ascii=False), encoding="utf-8")
    return dst
