"""Does a model know which bar is the tallest? Score its ranked chart documents.

    .venv/bin/python research/scripts/rank_probe.py [--model PATH] [--n 200] [--seed 5]

For N held-out grid charts (`pixtral.data.synth`; no training run uses seed 5's `--questions some`
images: stage 6 trains on its `--questions all` images, a random stream of their own) the model
reads the ranked document, the image then "Bar chart Sales, 3 bars, from tallest: C 7, A 4, D 1."
(the text of `pixtral data synth --documents ranked`), and we take its prediction of each label in
that list except the last, which the others force. A model that cannot rank but knows the chart's
labels scores the guessing loss, log(labels left), at every rank; the top-1 column says how often its
best guess is the right label. The first label of the list is the answer to "Which bar is the tallest?".
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import sys
import tempfile
from pathlib import Path

import torch

from pixtral.assets import default_model_dir
from pixtral.checkpoint import load_model
from pixtral.data.synth import generate_sample
from pixtral.errors import PixtralError
from pixtral.processing import load_processor


def label_positions(pieces: list[str], is_text: list[bool], k: int) -> list[int]:
    """Token positions of the k labels after the ranked list's colon."""
    start = max(j for j, (piece, text) in enumerate(zip(pieces, is_text)) if text and ":" in piece) + 1
    positions = [start] + [j + 1 for j in range(start, len(pieces) - 1) if "," in pieces[j]]
    return positions[:k]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    ap.add_argument("--n", type=int, default=200, help="number of charts (default 200)")
    ap.add_argument("--seed", type=int, default=5,
                    help="synthetic data seed (default 5: its --questions some charts are in no training set)")
    args = ap.parse_args(argv)
    if args.n < 1:
        raise PixtralError(f"--n must be at least 1, got {args.n}")
    model_dir = args.model or default_model_dir()
    model = load_model(model_dir, dtype=torch.float32).eval()
    processor = load_processor(model_dir)

    stats: dict[tuple[int, int], list[tuple[float, bool]]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        image_path = str(Path(tmp) / "chart.png")
        for index in range(args.n):
            sample = generate_sample(args.seed, index, "charts", layout="grid")
            sample.image.save(image_path)
            content = [{"type": "image_url", "image_url": {"url": image_path}},
                       {"type": "text", "text": sample.ranked}]
            ids, images, is_text = processor.encode_document(content)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor(ids), images), -1)
            k = int(re.search(r", (\d) (?:bars|points), from", sample.ranked).group(1))
            pieces = [processor.decode([t]) for t in ids]
            for rank, j in enumerate(label_positions(pieces, is_text, k)[:-1]):
                stats[(k, rank)].append((-logprobs[j - 1, ids[j]].item(), logprobs[j - 1].argmax().item() == ids[j]))

    print(f"{args.n} ranked chart documents (seed {args.seed}), model {model_dir}\n")
    print("| bars | rank | labels | loss | guessing loss | top-1 | guessing |")
    print("|---|---|---|---|---|---|---|")
    for (k, rank), values in sorted(stats.items()):
        left = k - rank
        loss = sum(v for v, _ in values) / len(values)
        top1 = sum(hit for _, hit in values) / len(values)
        print(f"| {k} | {rank + 1} | {len(values)} | {loss:.3f} | {math.log(left):.3f} | {100 * top1:.0f}% | "
              f"{100 / left:.0f}% |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PixtralError as exc:
        sys.exit(f"error: {exc}")
