"""A reading test in its simplest form: small white images with one letter or digit on them.

    .venv/bin/python research/scripts/single_glyph_data.py --out runs/single_glyph/train --n 8000 --seed 1
    .venv/bin/python research/scripts/single_glyph_data.py --out runs/single_glyph/val --n 300 --seed 2

Writes `pretrain.jsonl` (interleaved documents: the image, then the glyph as text) and the images.
The glyph is one of 20 (A-M without I and J, 1-9), drawn with the synthetic data's font and text
size (`pixtral.data.synth.draw`) at a random place, so it often straddles image-token boundaries,
as labels in the synthetic charts do. A model that reads gets the glyph's loss well under
ln(20) = 3.0 nats; the loss per text token reported by the trainer is the mean over the glyph and
the end of the document, so chance is about 1.5. `research/configs/single_glyph.yaml` trains on it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from pixtral.data.synth.draw import TEXT, Canvas

GLYPHS = list("ABCDEFGHKLM") + list("123456789")
SIZES = [(160, 96), (192, 128), (128, 128)]


def single_glyph_document(rng: random.Random) -> tuple[Canvas, str]:
    width, height = rng.choice(SIZES)
    canvas = Canvas(width, height)
    x = rng.sample(range(12, width - 12, 4), 1)[0]
    glyph = rng.choice(GLYPHS)
    canvas.text(x, rng.uniform(14, height - 14), glyph, size=TEXT)
    return canvas, glyph


def drill_args(description: str, extra=None) -> tuple[argparse.Namespace, random.Random]:
    """`--out DIR --n N --seed S` (and what `extra(parser)` adds) parsed, DIR/images/ made, and the
    seeded generator."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    return args, random.Random(args.seed)


def write_documents(make_document, id_prefix: str, description: str) -> None:
    """The drills' command line: `--out DIR --n N --seed S` writes DIR/pretrain.jsonl (one document
    per image: the image, then `make_document`'s text) and DIR/images/."""
    args, rng = drill_args(description)
    with open(args.out / "pretrain.jsonl", "w") as f:
        for i in range(args.n):
            canvas, text = make_document(rng)
            name = f"images/{i:06d}.png"
            canvas.image.save(args.out / name)
            f.write(json.dumps({"id": f"{id_prefix}-{i}", "category": "read", "content": [
                {"type": "image_url", "image_url": {"url": name}}, {"type": "text", "text": text}]}) + "\n")
    print(f"wrote {args.n} images to {args.out}")


if __name__ == "__main__":
    write_documents(single_glyph_document, "glyph", __doc__.splitlines()[0])
