"""Diagrams: 3-4 coloured shapes, each with a letter inside, joined by 1-2 arrows.

Templates (answers):
  count   "How many circles are there?"                    -> 1-3
  colour  "What colour is the shape labelled C?"           -> a colour
  shape   "What shape is labelled C?"                      -> circle/square/triangle/star
  arrow   "Which label does the arrow from C point to?"    -> a letter
"""

from __future__ import annotations

import math
import random

from pixtral.data.synth.base import Sample, Turn, choose_plan, shuffled
from pixtral.data.synth.draw import Canvas, cell_centre, ink_for, sample_grid_size, sample_size
from pixtral.data.synth.vocab import COLOR_NAMES, COLORS, INK, LETTERS, SHAPE_PLURALS, SHAPES

CATEGORY = "diagrams"
SINGLE = ("count", "colour", "shape", "arrow")
MULTI = (("arrow", "colour"), ("arrow", "shape"), ("count", "colour"), ("shape", "colour"),
         ("arrow", "shape", "colour"), ("colour", "colour"))
# questions="all" (training data): every template, about one image.
EVERY = (("count", "colour", "colour", "shape", "shape", "arrow"),)
QUESTIONS = {
    "count": "How many {plural} are there?",
    "colour": "What colour is the shape labelled {label}?",
    "shape": "What shape is labelled {label}?",
    "arrow": "Which label does the arrow from {label} point to?",
}
MIN_VIEW = (196, 196)  # a 2x2 grid of nodes fits, with arrows >= 20 px between them
MAX_RATIO = 1.3
GAP = 3  # between a shape and an arrow end


def generate(rng: random.Random, grid: bool = False, every: bool = False) -> Sample:
    width, height = (sample_grid_size if grid else sample_size)(rng, MIN_VIEW, MAX_RATIO)
    plan = choose_plan(rng, SINGLE, MULTI, EVERY if every else None)
    n = rng.randint(3, 4)
    if "count" in plan:
        counted, n_counted = rng.choice(SHAPES), rng.randint(1, 3)
        others = [s for s in SHAPES if s != counted]
        shapes = [counted] * n_counted + [rng.choice(others) for _ in range(n - n_counted)]
        rng.shuffle(shapes)
    else:
        counted, n_counted = None, 0
        shapes = [rng.choice(SHAPES) for _ in range(n)]
    colours = [rng.choice(COLOR_NAMES) for _ in range(n)]
    labels = rng.sample(LETTERS, n)

    canvas = Canvas(width, height)
    centres, radius = _layout(canvas, rng, n, grid)
    arrows = _arrows(rng, centres, radius, rng.randint(1, 2))
    _draw(canvas, centres, radius, shapes, colours, labels, arrows)

    # Nodes asked about: never the same node twice for the same kind of question.
    colour_nodes = iter(rng.sample(range(n), plan.count("colour")))
    shape_nodes = iter(rng.sample(range(n), plan.count("shape")))
    turns = []
    for template in plan:
        if template == "count":
            question, answer = QUESTIONS[template].format(plural=SHAPE_PLURALS[counted]), str(n_counted)
        elif template == "colour":
            i = next(colour_nodes)
            question, answer = QUESTIONS[template].format(label=labels[i]), colours[i]
        elif template == "shape":
            i = next(shape_nodes)
            question, answer = QUESTIONS[template].format(label=labels[i]), shapes[i]
        else:
            src, dst = rng.choice(arrows)
            question, answer = QUESTIONS[template].format(label=labels[src]), labels[dst]
        turns.append(Turn(f"{CATEGORY}.{template}", question, answer))
    # Reading order: top row, then bottom row (jitter never moves a node across the middle).
    order = sorted(range(n), key=lambda i: (centres[i][1] > canvas.h / 2, centres[i][0]))
    nodes = ", ".join(f"{colours[i]} {shapes[i]} {labels[i]}" for i in order)
    links = ", ".join(f"{labels[a]} to {labels[b]}" for a, b in arrows)
    description = f"Diagram: {nodes}. Arrows: {links}."
    keyed = shuffled(rng, [f"{labels[i]} {colours[i]} {shapes[i]}" for i in range(n)])
    arrows_keyed = shuffled(rng, [f"{labels[a]} to {labels[b]}" for a, b in arrows])
    lookup = f"Diagram: {', '.join(keyed)}. Arrows: {', '.join(arrows_keyed)}."
    return Sample(CATEGORY, canvas.image, turns, description, lookup, ranked=lookup)


def _layout(c: Canvas, rng: random.Random, n: int, grid: bool = False) -> tuple[list[tuple[float, float]], float]:
    """Node centres (n of the four cells of a 2x2 grid, slightly jittered) and radius. With `grid`,
    each centre is the centre of a token cell, with no jitter, and the radius at most 28, so that
    neighbours stay far enough apart for an arrow."""
    m = 4
    cw, ch = (c.w - 2 * m) / 2, (c.h - 2 * m) / 2
    cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], n)
    radius = min(36.0, (min(cw, ch) - 30) / 2.5)  # >= 25: a letter fits inside a star
    if grid:
        return [(cell_centre(m + cw * (col + 0.5)), cell_centre(m + ch * (row + 0.5))) for col, row in cells], min(radius, 28.0)
    # Jitter that keeps every arrow between neighbours at least 20 px long.
    jitter_x, jitter_y = (max(0.0, min(0.1 * size, (size - 2 * (1.25 * radius + GAP) - 20) / 2)) for size in (cw, ch))
    centres = [(m + cw * (col + 0.5) + rng.uniform(-jitter_x, jitter_x),
                m + ch * (row + 0.5) + rng.uniform(-jitter_y, jitter_y)) for col, row in cells]
    return centres, radius


def _arrows(rng: random.Random, centres, radius: float, count: int) -> list[tuple[int, int]]:
    """`count` arrows (source, target): distinct sources, no two-way pair, no crossing,
    none passing over a third shape."""
    n = len(centres)
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b and _clear(centres, radius, a, b)]
    for _ in range(100):
        chosen = rng.sample(pairs, count)
        if count == 1:
            return chosen
        (a, b), (p, q) = chosen
        if a != p and {a, b} != {p, q} and not _cross(centres[a], centres[b], centres[p], centres[q]):
            return chosen
    return chosen[:1]


def _clear(centres, radius: float, a: int, b: int) -> bool:
    (x0, y0), (x1, y1) = centres[a], centres[b]
    for i, (px, py) in enumerate(centres):
        if i in (a, b):
            continue
        dx, dy = x1 - x0, y1 - y0
        t = max(0.0, min(1.0, ((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy)))
        if math.hypot(x0 + t * dx - px, y0 + t * dy - py) < 1.4 * radius:
            return False
    return True


def _cross(p1, p2, p3, p4) -> bool:
    def side(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    return side(p1, p2, p3) * side(p1, p2, p4) < 0 and side(p3, p4, p1) * side(p3, p4, p2) < 0


def _draw(c: Canvas, centres, radius: float, shapes, colours, labels, arrows) -> None:
    for src, dst in arrows:
        (x0, y0), (x1, y1) = centres[src], centres[dst]
        d = math.hypot(x1 - x0, y1 - y0)
        ux, uy = (x1 - x0) / d, (y1 - y0) / d
        angle = math.atan2(uy, ux)
        out = c.shape_extent(shapes[src], radius, angle) + GAP
        back = c.shape_extent(shapes[dst], radius, angle + math.pi) + GAP
        c.arrow((x0 + ux * out, y0 + uy * out), (x1 - ux * back, y1 - uy * back), fill=INK)
    for (x, y), shape, colour, label in zip(centres, shapes, colours, labels):
        fill = COLORS[colour]
        c.shape(shape, x, y, radius, fill)
        c.text(x, y, label, fill=ink_for(fill))
