"""Misc scenes: simple coloured objects (balls, cars, houses, trees) spread over a grid.

Templates (answers):
  count         "How many cars are there?"          -> 1-5
  colour        "What colour is the ball?"          -> a colour (that object is unique)
  colour_count  "How many red objects are there?"   -> 1-4
"""

from __future__ import annotations

import math
import random

from pixtral.data.synth.base import Sample, Turn, choose_plan, shuffled
from pixtral.data.synth.draw import CELL, Canvas, sample_grid_size, sample_size
from pixtral.data.synth.vocab import BROWN, COLOR_NAMES, COLORS, OBJECT_PLURALS, OBJECTS, WHITE

CATEGORY = "misc"
SINGLE = ("count", "colour", "colour_count")
MULTI = (("count", "colour"), ("colour", "count"), ("colour", "colour"), ("count", "colour", "colour"))
# questions="all" (training data): every template, about one image; colour_count builds its own
# scene of repeated kinds, so it stays a conversation of its own.
EVERY = (("count", "colour", "colour"), ("colour_count",))
QUESTIONS = {
    "count": "How many {plural} are there?",
    "colour": "What colour is the {name}?",
    "colour_count": "How many {colour} objects are there?",
}
MIN_VIEW = (64, 64)
MAX_RATIO = 2.5
MIN_CELLS = 9  # the most objects a scene holds
MIN_CELL = 30  # view px per object (a 64 x 150 image holds a 5 x 2 grid)


def _grid(w: float, h: float, tokens: bool = False) -> tuple[int, int, float]:
    """(cols, rows, cell) with at least MIN_CELLS cells and the largest square cell; with `tokens`,
    the largest that is a whole number of token cells (CELL view px) wide."""
    best = (0, 0, 0.0)
    for cols in range(1, MIN_CELLS + 1):
        rows = -(-MIN_CELLS // cols)
        cell = min(w / cols, h / rows)
        if tokens:
            cell = math.floor(cell / CELL + 1e-6) * CELL  # + 1e-6: a scaled image is a hair short
        if cell > best[2]:
            best = (cols, rows, cell)
    return best


def generate(rng: random.Random, grid: bool = False, every: bool = False) -> Sample:
    width, height = (sample_grid_size if grid else sample_size)(
        rng, MIN_VIEW, MAX_RATIO, fits=lambda w, h: _grid(w, h, grid)[2] >= MIN_CELL)
    plan = choose_plan(rng, SINGLE, MULTI, EVERY if every else None)
    objects: list[tuple[str, str]] = []  # (kind, colour)
    turns = []
    if plan == ("colour_count",):
        colour, n = rng.choice(COLOR_NAMES), rng.randint(1, 4)
        others = [c for c in COLOR_NAMES if c != colour]
        objects += [(rng.choice(OBJECTS), colour) for _ in range(n)]
        objects += [(rng.choice(OBJECTS), rng.choice(others)) for _ in range(rng.randint(1, 3))]
        turns.append(Turn(f"{CATEGORY}.colour_count", QUESTIONS["colour_count"].format(colour=colour), str(n)))
    else:
        kinds = rng.sample(OBJECTS, len(plan))  # one distinct kind per question
        free = [k for k in OBJECTS if k not in kinds]  # kinds no question is about
        for template, kind in zip(plan, kinds):
            if template == "count":
                n = rng.randint(1, 5)
                objects += [(kind, rng.choice(COLOR_NAMES)) for _ in range(n)]
                turns.append(Turn(f"{CATEGORY}.count", QUESTIONS["count"].format(plural=OBJECT_PLURALS[kind]), str(n)))
            else:
                colour = rng.choice(COLOR_NAMES)
                objects.append((kind, colour))
                turns.append(Turn(f"{CATEGORY}.colour", QUESTIONS["colour"].format(name=kind), colour))
        extra = min(rng.randint(0, 3), MIN_CELLS - len(objects)) if free else 0
        objects += [(rng.choice(free), rng.choice(COLOR_NAMES)) for _ in range(extra)]

    canvas = Canvas(width, height)
    cols, rows, cell = _grid(canvas.w, canvas.h, grid)
    x0, y0 = (canvas.w - cols * cell) / 2, (canvas.h - rows * cell) / 2
    if grid:  # each object centred in its block of token cells
        x0, y0 = math.floor(x0 / CELL + 1e-6) * CELL, math.floor(y0 / CELL + 1e-6) * CELL
    places = rng.sample(range(cols * rows), len(objects))
    for (kind, colour), place in zip(objects, places):
        size = cell * rng.uniform(0.76, 0.9)
        slack = 0.0 if grid else (cell - size) / 2
        cx = x0 + cell * (place % cols + 0.5) + rng.uniform(-slack, slack)
        cy = y0 + cell * (place // cols + 0.5) + rng.uniform(-slack, slack)
        _draw_object(canvas, kind, cx, cy, size, COLORS[colour])
    in_order = [objects[i] for i in sorted(range(len(objects)), key=places.__getitem__)]  # reading order
    counts = [(sum(k == kind for k, _ in objects), kind) for kind in OBJECTS]
    totals = ", ".join(f"{n} {OBJECT_PLURALS[kind] if n > 1 else kind}" for n, kind in counts if n)
    description = f"Scene: {', '.join(f'{colour} {kind}' for kind, colour in in_order)}. {totals}."
    keyed = shuffled(rng, [f"{kind} {colour}" for kind, colour in objects])
    lookup = f"Scene: {', '.join(keyed)}. {totals}."
    return Sample(CATEGORY, canvas.image, turns, description, lookup, ranked=lookup)


def _draw_object(c: Canvas, kind: str, cx: float, cy: float, s: float, fill) -> None:
    """Draw `kind` filling about an s x s box centred on (cx, cy)."""
    h = s / 2
    if kind == "ball":
        c.ellipse(cx, cy, 0.45 * s, fill=fill)
    elif kind == "house":
        wall_top = cy - 0.05 * s
        c.polygon([(cx - h, wall_top), (cx, cy - h), (cx + h, wall_top)], fill=fill)  # roof
        c.rect(cx - 0.38 * s, wall_top, cx + 0.38 * s, cy + h, fill=fill)
        c.rect(cx - 0.08 * s, cy + 0.18 * s, cx + 0.08 * s, cy + h, fill=WHITE)  # door
    elif kind == "car":
        c.rect(cx - 0.28 * s, cy - 0.36 * s, cx + 0.22 * s, cy - 0.06 * s, fill=fill)  # cabin
        c.rect(cx - 0.2 * s, cy - 0.29 * s, cx + 0.14 * s, cy - 0.1 * s, fill=WHITE)  # window
        c.rect(cx - h, cy - 0.08 * s, cx + h, cy + 0.2 * s, fill=fill)  # body
        for wx in (cx - 0.27 * s, cx + 0.27 * s):
            c.ellipse(wx, cy + 0.22 * s, 0.13 * s, fill=(90, 90, 90))
    elif kind == "tree":
        c.rect(cx - 0.07 * s, cy + 0.05 * s, cx + 0.07 * s, cy + h, fill=BROWN)  # trunk
        c.ellipse(cx, cy - 0.12 * s, 0.36 * s, 0.38 * s, fill=fill)  # crown
    else:
        raise ValueError(f"unknown object {kind!r}")
