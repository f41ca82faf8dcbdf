"""Tables: 2-4 item rows by 2-3 lettered columns of values 1-9, with header cells.

Templates (answers):
  cell     "What is the value for Milk in column B?"        -> 1-9
  largest  "Which item has the largest value in column B?"  -> an item word
  rows     "How many items are in the table?"               -> 2-4
"""

from __future__ import annotations

import random

from pixtral.data.synth.base import Sample, Turn, choose_plan, shuffled
from pixtral.data.synth.draw import CELL, Canvas, sample_grid_size, sample_size
from pixtral.data.synth.vocab import DIGITS, INK, ITEMS, LETTERS

CATEGORY = "tables"
SINGLE = ("cell", "largest", "rows")
MULTI = (("largest", "rows"), ("rows", "cell"), ("largest", "cell"), ("largest", "cell", "rows"), ("cell", "cell"))
# questions="all" (training data): every template, about one image.
EVERY = (("largest", "cell", "cell", "rows"),)
QUESTIONS = {
    "cell": "What is the value for {item} in column {column}?",
    "largest": "Which item has the largest value in column {column}?",
    "rows": "How many items are in the table?",
}
MIN_VIEW = (184, 168)  # four rows and three columns fit
MAX_RATIO = 1.6
HEADER_FILLS = ((215, 215, 215), (200, 225, 250), (255, 230, 180))


def generate(rng: random.Random, grid: bool = False, every: bool = False) -> Sample:
    width, height = (sample_grid_size if grid else sample_size)(rng, MIN_VIEW, MAX_RATIO)
    plan = choose_plan(rng, SINGLE, MULTI, EVERY if every else None)
    n_rows, n_cols = rng.randint(2, 4), rng.randint(2, 3)
    items = rng.sample(ITEMS, n_rows)
    columns = sorted(rng.sample(LETTERS, n_cols), key=LETTERS.index)
    col_order = rng.sample(range(n_cols), n_cols)
    largest_col = col_order[0] if "largest" in plan else None
    # Columns asked for their largest value hold distinct values; others may repeat.
    grid_by_col = [rng.sample(DIGITS, n_rows) if j == largest_col else [rng.choice(DIGITS) for _ in range(n_rows)]
                   for j in range(n_cols)]
    values = [[grid_by_col[j][i] for j in range(n_cols)] for i in range(n_rows)]
    header_fill = rng.choice(HEADER_FILLS)

    canvas = Canvas(width, height)
    _draw(canvas, items, columns, values, header_fill, grid)

    # Cells asked about: never in the column whose largest value was asked (that answer
    # would hint at the cell's value), never the same cell twice.
    cells = [(i, j) for i in range(n_rows) for j in range(n_cols) if j != largest_col]
    asked = iter(rng.sample(cells, plan.count("cell")))
    turns = []
    for template in plan:
        if template == "cell":
            i, j = next(asked)
            question = QUESTIONS[template].format(item=items[i], column=columns[j])
            answer = str(values[i][j])
        elif template == "largest":
            column = [values[i][largest_col] for i in range(n_rows)]
            question = QUESTIONS[template].format(column=columns[largest_col])
            answer = items[column.index(max(column))]
        else:
            question, answer = QUESTIONS[template], str(n_rows)
        turns.append(Turn(f"{CATEGORY}.{template}", question, answer))
    rows = " ".join(f"{item}: {' '.join(map(str, row))}." for item, row in zip(items, values))
    head = f"Table, {n_rows} items, columns {' '.join(columns)}."
    description = f"{head} {rows}"
    cells = [f"{item} {column} {value}." for item, row in zip(items, values) for column, value in zip(columns, row)]
    lookup = f"{head} {' '.join(shuffled(rng, cells))}"
    by_column = []
    for j, column in enumerate(columns):
        order = sorted(range(n_rows), key=lambda i: -values[i][j])  # stable: ties top to bottom
        by_column.append(f"Column {column} from largest: {', '.join(f'{items[i]} {values[i][j]}' for i in order)}.")
    ranked = f"{head} {' '.join(by_column)}"
    return Sample(CATEGORY, canvas.image, turns, description, lookup, ranked)


def _draw(c: Canvas, items: list[str], columns: list[str], values: list[list[int]], header_fill,
          grid: bool = False) -> None:
    """The table centred on the canvas; with `grid`, on the token grid: every cell one CELL square
    (the item column whole cells wide) and the table's corner on a cell corner."""
    m = 8
    n_rows, n_cols = len(items), len(columns)
    head_w = max(c.text_width(item) for item in items) + 14
    avail_w, avail_h = c.w - 2 * m, c.h - 2 * m
    row_h = min(avail_h / (n_rows + 1), 44.0)
    col_w = min((avail_w - head_w) / n_cols, 64.0)
    if grid:
        head_w, row_h, col_w = -(-head_w // CELL) * CELL, CELL, CELL
    table_w, table_h = head_w + n_cols * col_w, row_h * (n_rows + 1)
    x0, y0 = (c.w - table_w) / 2, (c.h - table_h) / 2
    if grid:
        x0, y0 = round(x0 / CELL) * CELL, round(y0 / CELL) * CELL
    xs = [x0, x0 + head_w] + [x0 + head_w + col_w * (j + 1) for j in range(n_cols)]
    ys = [y0 + row_h * i for i in range(n_rows + 2)]

    c.rect(xs[1], ys[0], xs[-1], ys[1], fill=header_fill)
    c.rect(xs[0], ys[1], xs[1], ys[-1], fill=header_fill)
    for y in ys:
        c.line([(xs[1] if y == ys[0] else xs[0], y), (xs[-1], y)], fill=INK, width=2)
    for x in xs:
        c.line([(x, ys[1] if x == xs[0] else ys[0]), (x, ys[-1])], fill=INK, width=2)

    for j, column in enumerate(columns):
        c.text((xs[j + 1] + xs[j + 2]) / 2, (ys[0] + ys[1]) / 2, column)
    for i, item in enumerate(items):
        cy = (ys[i + 1] + ys[i + 2]) / 2
        c.text(xs[0] + 7, cy, item, align="left")
        for j in range(n_cols):
            c.text((xs[j + 1] + xs[j + 2]) / 2, cy, str(values[i][j]))
