"""The glyph-grid reading drill with every glyph centred in an image token of its own.

    .venv/bin/python research/scripts/aligned_glyph_grid_data.py --out runs/aligned_grid/train --n 20000 --seed 1
    .venv/bin/python research/scripts/aligned_glyph_grid_data.py --out runs/aligned_grid/val --n 300 --seed 2

The same pages as research/scripts/glyph_grid_data.py (1-4 rows of 1-5 cells, 30% of cells empty, described
row by row, e.g. "B 4 K. 7 A."), but each cell is exactly one image token: 32x32 px (16-px patches
merged 2x2) on an image the model sees unscaled. In the synthetic charts and tables, and on the
loose grid, a glyph usually straddles two to four tokens; here none does. Comparing the two drills
tells whether the split glyphs are what the model fails to read.
"""

from __future__ import annotations

import random
from functools import partial

from glyph_grid_data import grid_document  # this folder: the drills share glyphs, text and command line
from pixtral.data.synth.draw import Canvas
from single_glyph_data import GLYPHS, write_documents

TOKEN = 32  # image px per image token, and the image is not rescaled (both sides <= 256 px)


def aligned_grid(rng: random.Random) -> tuple[Canvas, list[list[str]]]:
    """A page and its glyphs, row by row (rows with no glyph left out), as `glyph_grid` gives them."""
    rows, cols = rng.randint(1, 4), rng.randint(1, 5)
    canvas = Canvas(max(64, cols * TOKEN), max(64, rows * TOKEN))  # 64 px: the smallest image side
    assert canvas.scale == 1.0
    glyph_rows = []
    for r in range(rows):
        row = [rng.choice(GLYPHS) if rng.random() >= 0.3 else None for _ in range(cols)]
        for c, glyph in enumerate(row):
            if glyph is not None:
                canvas.text((c + 0.5) * TOKEN, (r + 0.5) * TOKEN, glyph)
        if any(row):
            glyph_rows.append([g for g in row if g])
    return canvas, glyph_rows


if __name__ == "__main__":
    write_documents(partial(grid_document, grid=aligned_grid), "aligned", __doc__.splitlines()[0])
