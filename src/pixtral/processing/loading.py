"""Find the tokenizer that belongs to a checkpoint."""

from __future__ import annotations

from pathlib import Path

import mistral_common

from pixtral.errors import ConfigError
from pixtral.processing.images import LOCAL_POLICY, ImagePolicy
from pixtral.processing.processor import Processor

SHIPPED_TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


def load_processor(path: str | Path | None = None, image_policy: ImagePolicy = LOCAL_POLICY) -> Processor:
    """The processor for a checkpoint directory (its tekken.json), a tokenizer file, or the default model."""
    if path is None:
        from pixtral.assets import default_model_dir

        path = default_model_dir()
    path = Path(path).expanduser()
    if path.is_file():
        return Processor.from_file(path, image_policy)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such checkpoint directory or tokenizer file")
    if (path / "tekken.json").is_file():
        return Processor.from_file(path / "tekken.json", image_policy)
    # No tokenizer in the checkpoint: fall back to the one mistral-common ships for this model.
    from pixtral.checkpoint.files import find_files, read_args

    args = read_args(find_files(path))
    v = args.vision
    if args.vocab_size == 131072 and (v is None or (v.patch_size == 16 and v.spatial_merge_size == 1)):
        return Processor.from_file(SHIPPED_TEKKEN, image_policy)
    if args.vocab_size == 32768 and v is not None and v.patch_size == 16:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        return Processor(MistralTokenizer.v7(is_mm=True), image_policy)  # Pixtral-Large-2411
    raise ConfigError(
        f"{path}: no tekken.json in the checkpoint and no tokenizer shipped by mistral-common matches "
        f"its config (vocab {args.vocab_size}); copy the model's tekken.json into {path}"
    )


def write_tokenizer_for(args, dst: str | Path) -> Path:
    """Write a tekken.json whose image settings match `args` (for random/test checkpoints).

    It is mistral-common's Pixtral tokenizer (v3 Tekken) with the image block set to the
    model's patch size, maximum image size and merge size.
    """
    import json

    data = json.loads(SHIPPED_TEKKEN.read_text(encoding="utf-8"))
    v = args.vision
    if v is not None:
        data["image"] = {
            "image_patch_size": v.patch_size,
            "max_image_size": v.image_size,
            "spatial_merge_size": v.spatial_merge_size,
        }
    dst = Path(dst)
    dst.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dst
