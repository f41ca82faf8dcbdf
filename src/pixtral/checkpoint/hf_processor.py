"""The processor files of a Hugging Face export: what `transformers.AutoProcessor` needs beside the
weights and `config.json` to build a `PixtralProcessor` that gives our token ids and pixels.

Everything is derived from the checkpoint's `tekken.json` (read with mistral-common, as our own
`Processor` reads it) and checked against the model's config:

- `processor_config.json`: `PixtralProcessor`, the patch and merge sizes, the image token strings.
- `preprocessor_config.json`: `PixtralImageProcessor` with mistral-common's longest edge, CLIP
  mean/std, bicubic resampling and, as its patch size, one merged token's side (patch x merge), so
  that the image processor alone also resizes to the model's grid.
- `chat_template.jinja`: the template mistral-common generates for this tokenizer.
- `tokenizer_config.json`: the special tokens (`<s>`, `</s>`, `<unk>`, `<pad>`); transformers
  builds the tokenizer itself from `tekken.json`.

docs/architecture.md ("The Hugging Face export") says what matches mistral-common and what not.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

from pixtral.errors import ConfigError
from pixtral.model.args import ModelArgs


def hf_processor_files(args: ModelArgs, tokenizer_file: Path) -> dict[str, str]:
    """File name -> text of the processor files for an HF export with this tokenizer.

    Empty for a model without a vision encoder or a tokenizer without image support (the copied
    `tekken.json` alone is then the tokenizer). Raises ConfigError, before anything is written,
    when the tokenizer's patch or merge size is not the model's.
    """
    if args.vision is None:
        return {}
    tokenizer_file = Path(tokenizer_file)
    if "tekken" in tokenizer_file.name and tokenizer_file.suffix == ".json":
        return _processor_files(args, tokenizer_file)
    # mistral-common recognises a Tekken file by its name; the export names it tekken.json anyway
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "tekken.json"
        shutil.copyfile(tokenizer_file, copy)
        return _processor_files(args, copy, shown=tokenizer_file)


def _processor_files(args: ModelArgs, tokenizer_file: Path, shown: Path | None = None) -> dict[str, str]:
    from mistral_common.tokens.tokenizers.image import DATASET_MEAN, DATASET_STD

    from pixtral.processing.processor import Processor

    v = args.vision
    try:
        tokenizer = Processor.from_file(tokenizer_file).tokenizer
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(str(tokenizer_file), str(shown or tokenizer_file))) from None
    encoder = getattr(tokenizer.instruct_tokenizer, "image_encoder", None)
    if encoder is None:
        return {}
    image = getattr(encoder, "image_config", None) or encoder.mm_config
    patch, merge = image.image_patch_size, getattr(image, "spatial_merge_size", 1)
    if (patch, merge) != (v.patch_size, v.spatial_merge_size):
        raise ConfigError(
            f"{shown or tokenizer_file}: the tokenizer's image settings (image_patch_size {patch}, spatial_merge_size "
            f"{merge}) are not the model's (patch_size {v.patch_size}, spatial_merge_size {v.spatial_merge_size}); "
            "the Hugging Face processor needs one value of each: use the model's tokenizer"
        )
    text = tokenizer.instruct_tokenizer.tokenizer
    ids = encoder.special_ids
    piece = text.id_to_piece
    unit = patch * merge  # one image token covers unit x unit pixels
    processor = {
        "processor_class": "PixtralProcessor",
        "patch_size": patch,
        "spatial_merge_size": merge,
        "image_token": piece(ids.img),
        "image_break_token": piece(ids.img_break),
        "image_end_token": piece(ids.img_end),
    }
    image_processor = {
        "image_processor_type": "PixtralImageProcessor",
        "processor_class": "PixtralProcessor",
        "patch_size": {"height": unit, "width": unit},
        "size": {"longest_edge": image.max_image_size},
        "do_resize": True,
        "resample": 3,  # PIL.Image.BICUBIC
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(DATASET_MEAN),
        "image_std": list(DATASET_STD),
        "do_convert_rgb": True,
        "do_pad": True,
    }
    specials = {"bos_token": text.bos_id, "eos_token": text.eos_id, "unk_token": text.unk_id, "pad_token": text.pad_id}
    tokenizer_config = {
        "tokenizer_class": "TokenizersBackend",
        **{name: piece(i) for name, i in specials.items()},
        "padding_side": "left",
        "model_max_length": args.max_seq_len,
    }
    # generate() in transformers stops at EOS only when the checkpoint says which id that is.
    generation = {"bos_token_id": text.bos_id, "eos_token_id": text.eos_id, "pad_token_id": text.pad_id}
    files = {
        "processor_config.json": _dump(processor),
        "preprocessor_config.json": _dump(image_processor),
        "tokenizer_config.json": _dump(tokenizer_config),
        "generation_config.json": _dump(generation),
    }
    template = _chat_template(tokenizer_file)
    if template is not None:
        files["chat_template.jinja"] = template
    return files


def _chat_template(tokenizer_file: Path) -> str | None:
    try:
        from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template
    except ImportError:
        warnings.warn("this mistral-common cannot generate chat templates: the Hugging Face export has no "
                      "chat_template.jinja (upgrade mistral-common and convert again)", stacklevel=3)
        return None
    # BOS/EOS written as literals, so the template does not depend on the tokenizer's special-token map.
    return convert_tokenizer_to_chat_template(str(tokenizer_file), use_special_token_variables=False)


def _dump(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"
