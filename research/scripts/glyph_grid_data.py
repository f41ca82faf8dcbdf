"""A reading drill: letters and digits in a loose grid on a white image, described in reading order.

    .venv/bin/python research/scripts/glyph_grid_data.py --out runs/glyph_grid/train --n 20000 --seed 1
    .venv/bin/python research/scripts/glyph_grid_data.py --out runs/glyph_grid/val --n 300 --seed 2

Writes `pretrain.jsonl` (interleaved documents: the image, then its glyphs row by row, e.g.
"B 4 K. 7 A.") and the images. Between one glyph on a blank page (research/scripts/single_glyph_data.py) and
the synthetic charts and tables: several glyphs at once, to be read in order, as labels and cells are.
"""

from __future__ import annotations

import random

from pixtral.data.synth.draw import Canvas
from single_glyph_data import GLYPHS, write_documents  # this folder: the drills share glyphs and command line


def glyph_grid(rng: random.Random) -> tuple[Canvas, list[list[str]]]:
    """A page and its glyphs, row by row (rows with no glyph left out)."""
    rows, cols = rng.randint(1, 4), rng.randint(1, 5)
    cell_w, cell_h = rng.uniform(36, 56), rng.uniform(32, 52)
    scale = rng.uniform(1.0, 2.5)  # image px per view unit: the model sees every image at <= 256 px
    width = max(64, round((cols * cell_w + 16) * scale))
    height = max(64, round((rows * cell_h + 16) * scale))
    canvas = Canvas(width, height)
    glyph_rows: list[list[str]] = []
    for r in range(rows):
        row = []
        for c in range(cols):
            if rng.random() < 0.3:
                continue
            glyph = rng.choice(GLYPHS)
            x = 8 + (c + 0.5) * cell_w + rng.uniform(-0.15, 0.15) * cell_w
            y = 8 + (r + 0.5) * cell_h + rng.uniform(-0.1, 0.1) * cell_h
            canvas.text(x * scale / canvas.scale, y * scale / canvas.scale, glyph)  # into the canvas's view units
            row.append(glyph)
        if row:
            glyph_rows.append(row)
    return canvas, glyph_rows


def grid_document(rng: random.Random, grid=glyph_grid) -> tuple[Canvas, str]:
    """A page from `grid` (glyph_grid, or another with its signature) and its rows as text."""
    canvas, rows = grid(rng)
    return canvas, " ".join(" ".join(row) + "." for row in rows) if rows else "Blank."


if __name__ == "__main__":
    write_documents(grid_document, "grid", __doc__.splitlines()[0])
