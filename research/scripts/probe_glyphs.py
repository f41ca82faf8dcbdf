"""Can a digit be read back from the vision encoder's features? A linear probe, three ways.

    .venv/bin/python research/scripts/probe_glyphs.py [--model DIR] [--samples 3000]

Renders 256x256 images with the synthetic data's font and text size: a few random numbers as
clutter, and one digit in a cleared 32x32 block (one image token after the 2x2 patch merge) at a
random offset inside it. A logistic-regression probe is trained to name the digit from the four
16-px patches of that block, on 5/6 of the samples, and scored on the rest, from:
  - pixels:  the normalised pixels of the block (what any encoder could at best keep);
  - patch:   the patch embedding (ln_pre(patch_conv)), before the transformer layers;
  - encoder: the vision encoder's output, after its transformer layers.
If the encoder's features score like the pixels, what the model fails to read is not lost in
the encoder.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
import torch.nn.functional as F
from mistral_common.tokens.tokenizers.image import DATASET_MEAN, DATASET_STD
from PIL import Image, ImageDraw

from pixtral.assets import default_model_dir
from pixtral.checkpoint import load_model
from pixtral.data.synth.draw import TEXT, font

MEAN = torch.tensor(DATASET_MEAN)[:, None, None]
STD = torch.tensor(DATASET_STD)[:, None, None]


def sample(rng: random.Random) -> tuple[torch.Tensor, int, int, int]:
    """(normalised image [3, 256, 256], digit, block column, block row)."""
    image = Image.new("RGB", (256, 256), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        draw.text((rng.randint(0, 230), rng.randint(0, 230)), str(rng.randint(0, 99)), font=font(TEXT), fill="black")
    digit, bx, by = rng.randint(0, 9), rng.randint(0, 7), rng.randint(0, 7)
    draw.rectangle([bx * 32, by * 32, bx * 32 + 31, by * 32 + 31], fill="white")
    draw.text((bx * 32 + rng.randint(2, 14), by * 32 + rng.randint(20, 28)), str(digit), font=font(TEXT),
              fill="black", anchor="ls")
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    return (pixels - MEAN) / STD, digit, bx, by


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train: int, steps: int = 400) -> float:
    x = (features - features[:train].mean(0)) / (features[:train].std(0) + 1e-6)
    weight = torch.zeros(x.shape[1], 10, requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(x[:train] @ weight + bias, labels[:train]) + 1e-3 * weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((x[train:] @ weight + bias).argmax(-1) == labels[train:]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    torch.manual_seed(opts.seed)
    model = load_model(opts.model or default_model_dir(), device="cpu", dtype=torch.float32).eval()
    encoder, patch = model.vision_encoder, model.args.vision.patch_size
    if patch != 16 or model.args.vision.image_size < 256:
        raise SystemExit("this probe assumes 16-px patches and images of 256 px")
    rng = random.Random(opts.seed)
    features: dict[str, list[torch.Tensor]] = {"pixels": [], "patch": [], "encoder": []}
    labels = []
    with torch.no_grad():
        for _ in range(opts.samples):
            image, digit, bx, by = sample(rng)
            rows = [(2 * by + dy) * 16 + 2 * bx + dx for dy in (0, 1) for dx in (0, 1)]
            features["pixels"].append(image[:, by * 32: by * 32 + 32, bx * 32: bx * 32 + 32].flatten())
            features["patch"].append(encoder.ln_pre(encoder.patchify([image]))[rows].flatten())
            features["encoder"].append(encoder([image])[0][rows].flatten())
            labels.append(digit)
    y = torch.tensor(labels)
    train = opts.samples * 5 // 6
    for name, rows in features.items():
        x = torch.stack(rows)
        print(f"{name:8s} {x.shape[1]:5d} dims: held-out accuracy {probe_accuracy(x, y, train):.3f} "
              f"({opts.samples - train} digits, chance 0.1)")


if __name__ == "__main__":
    main()
