"""Charts: a bar or line chart of 2-5 lettered values (1-9), each value printed.

Templates (answers):
  tallest   "Which bar is the tallest?" / "Which point is the highest?"   -> a letter
  shortest  "Which bar is the shortest?" / "Which point is the lowest?"   -> a letter
  value     "What is the value of bar C?" / "What is the value at point C?" -> 1-9
  count     "How many bars are there?" / "How many points are there?"   -> 2-5
"""

from __future__ import annotations

import random

from pixtral.data.synth.base import Sample, Turn, choose_plan, shuffled
from pixtral.data.synth.draw import CELL, TEXT, Canvas, sample_grid_size, sample_size
from pixtral.data.synth.vocab import CHART_TITLES, COLOR_NAMES, COLORS, DIGITS, GREY, INK, LETTERS, WHITE

CATEGORY = "charts"
SINGLE = ("tallest", "shortest", "value", "count")
MULTI = (("tallest", "count"), ("shortest", "count"), ("count", "value"), ("count", "value", "value"))
# questions="all" (training data): every template, about one image.
EVERY = (("tallest", "shortest", "value", "value", "count"),)
QUESTIONS = {
    "bar": {
        "tallest": "Which bar is the tallest?",
        "shortest": "Which bar is the shortest?",
        "value": "What is the value of bar {label}?",
        "count": "How many bars are there?",
    },
    "line": {
        "tallest": "Which point is the highest?",
        "shortest": "Which point is the lowest?",
        "value": "What is the value at point {label}?",
        "count": "How many points are there?",
    },
}
MIN_VIEW = (176, 164)  # five bars with their values and labels fit
MAX_RATIO = 1.6
MAX_VALUE = max(DIGITS)


def generate(rng: random.Random, grid: bool = False, every: bool = False) -> Sample:
    width, height = (sample_grid_size if grid else sample_size)(rng, MIN_VIEW, MAX_RATIO)
    plan = choose_plan(rng, SINGLE, MULTI, EVERY if every else None)
    kind = rng.choice(("bar", "line"))
    k = rng.randint(2, 5)
    labels = sorted(rng.sample(LETTERS, k), key=LETTERS.index)
    if "tallest" in plan or "shortest" in plan:
        values = rng.sample(DIGITS, k)  # distinct: one tallest and one shortest
    else:
        values = [rng.choice(DIGITS) for _ in range(k)]
    colour = rng.choice(COLOR_NAMES if kind == "bar" else tuple(c for c in COLOR_NAMES if c != "yellow"))
    title = rng.choice(CHART_TITLES)

    canvas = Canvas(width, height)
    (_draw_grid if grid else _draw)(canvas, kind, labels, values, COLORS[colour], title)

    asked = iter(rng.sample(range(k), plan.count("value")))
    questions = QUESTIONS[kind]
    turns = []
    for template in plan:
        if template == "tallest":
            answer = labels[values.index(max(values))]
            question = questions[template]
        elif template == "shortest":
            answer = labels[values.index(min(values))]
            question = questions[template]
        elif template == "value":
            i = next(asked)
            question, answer = questions[template].format(label=labels[i]), str(values[i])
        else:
            question, answer = questions[template], str(k)
        turns.append(Turn(f"{CATEGORY}.{template}", question, answer))
    pairs = [f"{label} {value}" for label, value in zip(labels, values)]
    head = f"{kind.capitalize()} chart {title}, {k} {'bars' if kind == 'bar' else 'points'}"
    description = f"{head}: {', '.join(pairs)}."
    lookup = f"{head}: {', '.join(shuffled(rng, pairs))}."
    by_value = sorted(range(k), key=lambda i: -values[i])  # stable: equal values in reading order
    top = "tallest" if kind == "bar" else "highest"
    ranked = f"{head}, from {top}: {', '.join(pairs[i] for i in by_value)}."
    return Sample(CATEGORY, canvas.image, turns, description, lookup, ranked)


def _draw(c: Canvas, kind: str, labels: list[str], values: list[int], fill, title: str) -> None:
    m = 8
    row = TEXT + 6  # height of one line of text
    left = m + 6
    top_axis = m + row  # the y axis starts under the title
    plot_top = top_axis + row  # room for the value printed above the highest bar
    base = c.h - m - row  # x axis; labels are drawn below it
    right = c.w - m

    c.text(left - 2, m + row / 2, title, fill=INK, align="left")
    c.line([(left, top_axis), (left, base), (right, base)], fill=INK, width=2, joint="curve")
    c.line([(left - 4, top_axis + 5), (left, top_axis), (left + 4, top_axis + 5)], fill=INK, width=2)

    k = len(values)
    slot = (right - left - 4) / k
    xs = [left + 4 + slot * (i + 0.5) for i in range(k)]
    ys = [base - (v / MAX_VALUE) * (base - plot_top) for v in values]
    for x, label in zip(xs, labels):
        c.text(x, base + row / 2 + 1, label)

    value_y = (lambda y: y - row / 2) if kind == "bar" else (lambda y: y - row / 2 - 2)
    _marks(c, kind, xs, ys, values, fill, base, min(0.32 * slot, 24), value_y)


def _marks(c: Canvas, kind: str, xs: list[float], ys: list[float], values: list[int], fill, base: float,
           half: float, value_y) -> None:
    """Bars of half-width `half` down to `base` (or a line through points with ticks on the axis),
    each value printed centred on (x, value_y(y))."""
    if kind == "bar":
        for x, y, v in zip(xs, ys, values):
            c.rect(x - half, y, x + half, base, fill=fill)
            c.text(x, value_y(y), str(v))
    else:
        for x in xs:
            c.line([(x, base - 3), (x, base + 3)], fill=GREY, width=2)
        c.line(list(zip(xs, ys)), fill=fill, width=3, joint="curve")
        for x, y, v in zip(xs, ys, values):
            c.ellipse(x, y, 5, fill=fill)
            c.text(x, value_y(y), str(v), box=WHITE)


def _draw_grid(c: Canvas, kind: str, labels: list[str], values: list[int], fill, title: str) -> None:
    """`_draw` on the token grid: the title in the top row of cells, the y axis at the right edge of
    the first column, one bar or point per column of cells (spread over the rest), the labels in
    the bottom row, and each value in the cell above its bar or point."""
    cols, rows = round(c.w / CELL), round(c.h / CELL)
    left, base, top_axis = CELL - 4, (rows - 1) * CELL, CELL
    plot_top = 2 * CELL + 6  # the highest bar or point leaves the second row for its value
    c.text(left - 2, CELL / 2, title, fill=INK, align="left")
    c.line([(left, top_axis), (left, base), (c.w - 4, base)], fill=INK, width=2, joint="curve")
    c.line([(left - 4, top_axis + 5), (left, top_axis), (left + 4, top_axis + 5)], fill=INK, width=2)

    k, span = len(values), cols - 1
    xs = [(1 + (2 * i + 1) * span // (2 * k) + 0.5) * CELL for i in range(k)]
    ys = [base - (v / MAX_VALUE) * (base - plot_top) for v in values]
    for x, label in zip(xs, labels):
        c.text(x, base + CELL / 2, label)

    # Each value in the cell above the one holding the top of its bar (or of its point, radius 5).
    top = 0 if kind == "bar" else 5
    half = min(0.32 * span * CELL / k, 14)  # inside its column of cells
    _marks(c, kind, xs, ys, values, fill, base, half, lambda y: ((y - top) // CELL - 0.5) * CELL)

