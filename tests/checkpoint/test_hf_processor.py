"""The Hugging Face export carries what transformers' AutoProcessor needs (processor and image
processor configs, a chat template, the tokenizer's special tokens), and transformers then gives our
token ids, our pixels and our logits.

Three exports: the embedded default model (Mistral3: patch 16, 2x2 merge, images up to 256 px, a
4000-id Tekken), `tiny` (LLaVA, the Pixtral-12B layout: patch 16, no merge, up to 1024 px, the full
Tekken) and `tiny-small-3.1` (Mistral3: patch 14, 2x2 merge, up to 1540 px).

transformers' `PixtralProcessor` needs torchvision, which has no build for this project's CPU torch
on PyPI (docs/architecture.md, "The Hugging Face export"). So two tests:
- `test_transformers_components_give_our_ids_pixels_and_logits` always runs: it drives the pieces the
  processor is made of, loaded from the export as the processor loads them (TokenizersBackend from
  `tekken.json`, AutoImageProcessor, `chat_template.jinja`, `processor_config.json`), and expands
  each `[IMG]` as `PixtralProcessor.replace_image_token` does.
- `test_auto_processor_gives_our_ids_pixels_and_logits` runs `AutoProcessor` itself, where
  torchvision imports.

Exactness: ids are compared exactly. Pixels are exact with transformers' PIL image backend (the same
float32 divide by 255, subtract mean, divide by std as mistral-common, on images that need no
resize) and within 1e-6 with its torchvision backend, which folds the rescale into the normalisation
(1 ulp at the values' size, 2.4e-7 seen). Logits (fp32, different operation order) within 1e-4.
The chats use images whose sides are multiples of one merged token: images that must be resized
differ, as `test_where_transformers_differs` pins down.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pixtral.assets import DEFAULT_MODEL_DIR
from pixtral.checkpoint import convert_checkpoint, load_model, save_model
from pixtral.cli.main import main
from pixtral.errors import ConfigError
from pixtral.model import preset
from pixtral.processing import load_processor
from pixtral.processing.loading import write_tokenizer_for
from tests.checkpoint.test_convert import tensors
from tests.conftest import random_model

transformers = pytest.importorskip("transformers")

MODELS = {"default": "Mistral3ForConditionalGeneration", "tiny": "LlavaForConditionalGeneration",
          "tiny-small-3.1": "Mistral3ForConditionalGeneration"}
PROCESSOR_FILES = ["chat_template.jinja", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                   "tokenizer_config.json"]


def torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a build for another torch whose compiled ops fail to load
        return False
    return True


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def chats(unit: int) -> dict[str, list[dict]]:
    """Fresh message lists (transformers rewrites message dicts), in the format both sides take."""
    a = noise_image(2 * unit, 3 * unit, seed=1)
    b = noise_image(5 * unit, 2 * unit, seed=2)
    image = lambda im: {"type": "image", "image": im}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    return {
        "text_only": [{"role": "user", "content": "Hello there! What is 12 + 30?\n\nAnswer   briefly."}],
        "system_and_history": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another, in Français: été?"},
        ],
        "one_image": [{"role": "user", "content": [image(a), text("Describe the image.")]}],
        # mistral-common moves a lone image after text to the front; the template does the same
        "text_then_image": [{"role": "user", "content": [text("What is this?"), image(a)]}],
        "two_images_two_sizes": [{"role": "user", "content": [
            text("Compare"), image(a), text("with"), image(b), text("please.")]}],
        "images_in_two_turns": [
            {"role": "user", "content": [image(b), text("First one.")]},
            {"role": "assistant", "content": "A wide noisy picture."},
            {"role": "user", "content": [text("And this?"), image(a)]},
        ],
    }


def images_of(chat: list[dict]) -> list[Image.Image]:
    return [p["image"] for m in chat if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]


def _export(name: str, root) -> SimpleNamespace:
    if name == "default":
        src = DEFAULT_MODEL_DIR
    else:
        model = random_model(name)
        src = save_model(model, root / "mistral", tokenizer_file=write_tokenizer_for(model.args, root / "tekken.json"))
    hf_dir = convert_checkpoint(src, root / "hf", to="hf")
    ours = load_model(src, dtype=torch.float32)
    v = ours.args.vision
    return SimpleNamespace(
        name=name, src=src, hf_dir=hf_dir, ours=ours, processor=load_processor(src),
        unit=v.patch_size * v.spatial_merge_size,
        hf=transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval(),
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    cache: dict[str, SimpleNamespace] = {}

    def get(name: str) -> SimpleNamespace:
        if name not in cache:
            cache[name] = _export(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def hf_logits(hf, ids: list[int], pixel_values=None, image_sizes=None) -> torch.Tensor:
    with torch.no_grad():
        if pixel_values is None:
            return hf(input_ids=torch.tensor([ids])).logits[0]
        return hf(input_ids=torch.tensor([ids]), pixel_values=pixel_values, image_sizes=image_sizes).logits[0]


def check_same(e: SimpleNamespace, chat: list[dict], ids: list[int], pixel_values, image_sizes, exact: bool) -> None:
    """ids, pixels (cropped from the padded batch) and logits against ours."""
    expected_ids, expected_images = e.processor.encode_chat(chat)
    assert ids == expected_ids
    sizes = [] if image_sizes is None else [tuple(s) for s in torch.as_tensor(image_sizes).tolist()]
    assert sizes == [tuple(img.shape[1:]) for img in expected_images]
    for i, (img, (h, w)) in enumerate(zip(expected_images, sizes)):
        got = torch.as_tensor(pixel_values[i])[:, :h, :w]
        assert got.dtype == torch.float32
        if exact:
            assert torch.equal(got, img), f"image {i}: max diff {(got - img).abs().max():.3g}"
        else:
            torch.testing.assert_close(got, img, rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = e.ours(torch.tensor(expected_ids), expected_images)
    if sizes:
        got = hf_logits(e.hf, ids, torch.as_tensor(pixel_values), torch.as_tensor(image_sizes))
    else:
        got = hf_logits(e.hf, ids)
    assert expected.abs().max() > 1.0  # real logits, not a degenerate output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class Components:
    """What `PixtralProcessor` is built from, loaded from the export as it loads them."""

    def __init__(self, hf_dir):
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        self.tokenizer = TokenizersBackend.from_pretrained(hf_dir)  # what PixtralProcessor loads
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(hf_dir, backend="pil")
        self.template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
        self.config = json.loads((hf_dir / "processor_config.json").read_text())

    def __call__(self, chat: list[dict]):
        text = self.tokenizer.apply_chat_template(chat, chat_template=self.template, tokenize=False)
        images = images_of(chat)
        pixel_values = image_sizes = None
        if images:
            out = self.image_processor(images, return_tensors="pt")
            pixel_values, image_sizes = out["pixel_values"], out["image_sizes"]
            c = self.config
            unit = c["patch_size"] * c["spatial_merge_size"]
            pieces = text.split(c["image_token"])
            assert len(pieces) == len(images) + 1
            blocks = []
            for h, w in image_sizes.tolist():  # PixtralProcessor.replace_image_token
                rows = "".join([c["image_token"] * (w // unit) + c["image_break_token"]] * (h // unit))
                blocks.append(rows[: -len(c["image_break_token"])] + c["image_end_token"])
            text = pieces[0] + "".join(block + piece for block, piece in zip(blocks, pieces[1:]))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, pixel_values, image_sizes


@pytest.mark.parametrize("name", list(MODELS))
def test_export_writes_the_processor_files(exports, name):
    from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template
    from mistral_common.tokens.tokenizers.image import DATASET_MEAN, DATASET_STD

    e = exports(name)
    names = sorted(p.name for p in e.hf_dir.iterdir())
    assert names == sorted(["config.json", "model.safetensors", "tekken.json", *PROCESSOR_FILES])
    assert json.loads((e.hf_dir / "config.json").read_text())["architectures"] == [MODELS[name]]
    v = e.ours.args.vision
    image_config = e.processor.tokenizer.instruct_tokenizer.image_encoder.image_config
    assert json.loads((e.hf_dir / "processor_config.json").read_text()) == {
        "processor_class": "PixtralProcessor", "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
        "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
    pre = json.loads((e.hf_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "PixtralImageProcessor"
    assert pre["size"] == {"longest_edge": image_config.max_image_size}
    assert pre["patch_size"] == {"height": e.unit, "width": e.unit}
    assert (pre["image_mean"], pre["image_std"]) == (list(DATASET_MEAN), list(DATASET_STD))
    assert pre["resample"] == 3 and pre["rescale_factor"] == 1 / 255
    tok = json.loads((e.hf_dir / "tokenizer_config.json").read_text())
    assert {k: tok[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")} == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    generation = transformers.GenerationConfig.from_pretrained(e.hf_dir)  # generate() stops at </s>
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
    assert (e.hf_dir / "chat_template.jinja").read_text() == convert_tokenizer_to_chat_template(
        str(e.hf_dir / "tekken.json"), use_special_token_variables=False)
    # transformers reads them: the image processor with the export's settings
    ip = transformers.AutoImageProcessor.from_pretrained(e.hf_dir, backend="pil")
    assert type(ip).__name__ == "PixtralImageProcessorPil"
    assert (ip.size["longest_edge"], ip.patch_size["height"]) == (image_config.max_image_size, e.unit)


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_components_give_our_ids_pixels_and_logits(exports, name):
    e = exports(name)
    encode = Components(e.hf_dir)
    for case, chat in chats(e.unit).items():
        ids, pixel_values, image_sizes = encode(chat)
        check_same(e, chats(e.unit)[case], ids, pixel_values, image_sizes, exact=True)


@pytest.mark.skipif(not torchvision_importable(), reason="transformers' PixtralProcessor needs torchvision")
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("name", list(MODELS))
def test_auto_processor_gives_our_ids_pixels_and_logits(exports, name, backend):
    e = exports(name)
    processor = transformers.AutoProcessor.from_pretrained(e.hf_dir, backend=backend)
    assert type(processor).__name__ == "PixtralProcessor"
    assert processor.image_token_ids == [10, 12, 13]
    for case, chat in chats(e.unit).items():
        out = processor.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
        check_same(e, chats(e.unit)[case], out["input_ids"][0].tolist(), out.get("pixel_values"),
                   out.get("image_sizes"), exact=backend == "pil")


def test_where_transformers_differs(exports):
    """The documented differences (docs/architecture.md, "The Hugging Face export"), on the default model."""
    e = exports("default")
    encode = Components(e.hf_dir)
    ours = lambda chat: e.processor.encode_chat(chat)  # noqa: E731

    # 1. mistral-common strips trailing whitespace from assistant turns; the template keeps it.
    history = lambda answer: [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer},  # noqa: E731
                              {"role": "user", "content": "Bye"}]
    assert encode(history("Hello!  "))[0] != ours(history("Hello!  "))[0]
    assert encode(history("Hello!"))[0] == ours(history("Hello!  "))[0]

    # 2. Control-token strings in text: plain text for mistral-common, control tokens in transformers.
    chat = [{"role": "user", "content": "What does [INST] mean?"}]
    assert ours(chat)[0].count(3) == 1 and encode(chat)[0].count(3) == 2

    # 3. Images that must be resized: transformers rounds the scaled size down (mistral-common rounds
    #    to nearest), so the grid can differ: 513 x 130 px scaled by 256/513 is 64.87 px high, 3 rows
    #    of 32 px here, 2 there.
    def user(im):
        return [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "?"}]}]

    im = noise_image(513, 130, seed=3)
    assert ours(user(im))[1][0].shape[1:] == (96, 256)
    assert tuple(encode(user(im))[2][0].tolist()) == (64, 256)
    #    Where the grid agrees the ids agree, but the pixels do not: PIL (and torchvision) resample
    #    uint8 with antialiasing, mistral-common float32 with OpenCV's bicubic, no antialiasing.
    im = noise_image(329, 287, seed=4)
    ids, images = ours(user(im))
    hf_ids, pixel_values, _ = encode(user(im))
    assert hf_ids == ids and pixel_values.shape[1:] == images[0].shape == (3, 224, 256)
    assert (pixel_values[0] - images[0]).abs().max() > 0.1


def test_round_trip_with_processor_files_is_bit_exact(tiny_checkpoint, tmp_path):
    hf = convert_checkpoint(tiny_checkpoint, tmp_path / "hf", to="hf")
    assert all((hf / name).is_file() for name in PROCESSOR_FILES)
    back = convert_checkpoint(hf, tmp_path / "back", to="mistral")
    assert sorted(p.name for p in back.iterdir()) == ["consolidated.safetensors", "params.json", "tekken.json"]
    a, b = tensors(tiny_checkpoint), tensors(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert (back / "tekken.json").read_bytes() == (tiny_checkpoint / "tekken.json").read_bytes()
    # and the CLI writes the same files
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "cli"), "--to", "hf"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(p.name for p in hf.iterdir())


def test_processor_files_follow_the_tokenizer(tmp_path):
    model = random_model("tiny")
    # No tokenizer: the weights and config.json only, as before.
    out = save_model(model, tmp_path / "none", layout="hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # Any file name will do (mistral-common itself only reads files named tekken*.json).
    tok = write_tokenizer_for(model.args, tmp_path / "tekken.json")
    out = save_model(model, tmp_path / "named", layout="hf", tokenizer_file=tok.rename(tmp_path / "tok.json"))
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", "tekken.json",
                                                            *PROCESSOR_FILES])
    # A tokenizer without images: it is copied, but there is no image processor to describe.
    data = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    del data["image"]
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "tekken.json").write_text(json.dumps(data), encoding="utf-8")
    out = save_model(model, tmp_path / "text-out", layout="hf", tokenizer_file=tmp_path / "text" / "tekken.json")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tekken.json"]
    # A tokenizer whose patch size is not the model's is refused before anything is written.
    other = write_tokenizer_for(preset("tiny-small-3.1"), tmp_path / "patch14.json")
    with pytest.raises(ConfigError, match=r"patch14.json: the tokenizer's image settings \(image_patch_size 14"):
        save_model(model, tmp_path / "bad", layout="hf", tokenizer_file=other)
    assert not (tmp_path / "bad").exists()
