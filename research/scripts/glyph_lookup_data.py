"""A lookup drill: on the reading drill's glyph grids, "What comes after X?" (the next glyph in X's row).

    .venv/bin/python research/scripts/glyph_lookup_data.py --out runs/glyph_lookup/train --n 20000 --seed 11
    .venv/bin/python research/scripts/glyph_lookup_data.py --out runs/glyph_lookup/val --n 300 --seed 12

With `--aligned`, on the grids of research/scripts/aligned_glyph_grid_data.py (every glyph in an image token
of its own) instead.

Writes `chat.jsonl` (one question per image, the answer one glyph) and the images. X occurs once
on its page. The synthetic questions need this step (find the label, then what is next to it);
the reading drill (research/scripts/glyph_grid_data.py) only asks for the glyphs in order.
"""

from __future__ import annotations

import json
import random

from aligned_glyph_grid_data import aligned_grid  # this folder
from glyph_grid_data import glyph_grid
from single_glyph_data import drill_args


def lookup_question(rng: random.Random, grid=glyph_grid):
    """(canvas, X, the glyph after X), or None for a page with no glyph that occurs once and has a
    right neighbour."""
    canvas, rows = grid(rng)
    glyphs = [g for row in rows for g in row]
    pairs = [(row[i], row[i + 1]) for row in rows for i in range(len(row) - 1) if glyphs.count(row[i]) == 1]
    return (canvas, *rng.choice(pairs)) if pairs else None


def main() -> None:
    args, rng = drill_args(__doc__.splitlines()[0], extra=lambda ap: ap.add_argument(
        "--aligned", action="store_true", help="every glyph in an image token of its own"))
    grid = aligned_grid if args.aligned else glyph_grid
    written = 0
    with open(args.out / "chat.jsonl", "w") as f:
        while written < args.n:
            made = lookup_question(rng, grid)
            if made is None:
                continue
            canvas, glyph, after = made
            name = f"images/{written:06d}.png"
            canvas.image.save(args.out / name)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": name}},
                                             {"type": "text", "text": f"What comes after {glyph}?"}]},
                {"role": "assistant", "content": after}]}) + "\n")
            written += 1
    print(f"wrote {written} questions to {args.out}")


if __name__ == "__main__":
    main()
