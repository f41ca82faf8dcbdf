"""Document pages: a title, 2-4 lines "Word: n" (n in 1-9), grey filler text lines.

Templates (answers):
  title  "What is the title of the document?"          -> a title word
  after  "What number comes after the word Price?"     -> 1-9
  which  "Which word is followed by the number 7?"     -> a field word
"""

from __future__ import annotations

import random

from pixtral.data.synth.base import Sample, Turn, choose_plan, shuffled
from pixtral.data.synth.draw import CELL, TEXT, TITLE, Canvas, sample_grid_size, sample_size
from pixtral.data.synth.vocab import DIGITS, FIELDS, GREY, INK, LIGHT_GREY, TITLES

CATEGORY = "documents"
SINGLE = ("title", "after", "which")
MULTI = (("title", "after"), ("after", "title"), ("which", "title"), ("title", "after", "after"))
# questions="all" (training data): every template, about one image.
EVERY = (("title", "after", "which"),)
QUESTIONS = {
    "title": "What is the title of the document?",
    "after": "What number comes after the word {word}?",
    "which": "Which word is followed by the number {number}?",
}
MIN_VIEW = (148, 196)  # the longest title and four field lines fit
MAX_RATIO = 1.5
PORTRAIT_BIAS = 0.2  # pages lean portrait
FIELD_ROW = TEXT + 12  # height of one "Word: n" line
FILLER_ROW = 12  # height of one grey filler line


def generate(rng: random.Random, grid: bool = False, every: bool = False) -> Sample:
    width, height = (sample_grid_size if grid else sample_size)(rng, MIN_VIEW, MAX_RATIO, portrait_bias=PORTRAIT_BIAS)
    plan = choose_plan(rng, SINGLE, MULTI, EVERY if every else None)
    title = rng.choice(TITLES)
    k = rng.randint(2, 4)
    words = rng.sample(FIELDS, k)
    if "which" in plan:
        numbers = rng.sample(DIGITS, k)  # distinct: each number names one word
    else:
        numbers = [rng.choice(DIGITS) for _ in range(k)]

    canvas = Canvas(width, height)
    (_draw_grid if grid else _draw)(canvas, rng, title, words, numbers)

    asked = iter(rng.sample(range(k), plan.count("after") + plan.count("which")))
    turns = []
    for template in plan:
        if template == "title":
            question, answer = QUESTIONS[template], title
        elif template == "after":
            i = next(asked)
            question, answer = QUESTIONS[template].format(word=words[i]), str(numbers[i])
        else:
            i = next(asked)
            question, answer = QUESTIONS[template].format(number=numbers[i]), words[i]
        turns.append(Turn(f"{CATEGORY}.{template}", question, answer))
    fields = " ".join(f"{word}: {number}." for word, number in zip(words, numbers))
    description = f"Document titled {title}. {fields}"
    # Half the fields the other way round ("7 follows Floor."), for "Which word is followed by 7?".
    looked_up = [f"{word}: {number}." if rng.random() < 0.5 else f"{number} follows {word}."
                 for word, number in shuffled(rng, list(zip(words, numbers)))]
    lookup = f"Document titled {title}. {' '.join(looked_up)}"
    # No comparison here; the number-first form, largest first, drills "Which word is followed by 7?".
    by_number = sorted(range(k), key=lambda i: -numbers[i])
    ranked = f"Document titled {title}. {' '.join(f'{numbers[i]} follows {words[i]}.' for i in by_number)}"
    return Sample(CATEGORY, canvas.image, turns, description, lookup, ranked)


def _draw(c: Canvas, rng: random.Random, title: str, words: list[str], numbers: list[int]) -> None:
    m = 10
    c.rect(3, 3, c.w - 3, c.h - 3, outline=LIGHT_GREY, width=2)
    title_y = m + TITLE / 2 + 2
    if rng.random() < 0.5:
        c.text(m, title_y, title, size=TITLE, align="left")
    else:
        c.text(c.w / 2, title_y, title, size=TITLE)
    rule_y = title_y + TITLE / 2 + 4
    c.line([(m, rule_y), (c.w - m, rule_y)], fill=INK, width=2)

    # Field lines in order, with grey filler lines spread over the spare height.
    top, bottom = rule_y + 6, c.h - m
    spare = int((bottom - top - len(words) * FIELD_ROW) // FILLER_ROW)
    fillers = [0] * (len(words) + 1)
    for _ in range(max(0, spare)):
        if rng.random() < 0.7:
            fillers[rng.randrange(len(fillers))] += 1
    y = top
    indent = m + rng.choice((0, 4, 10))
    for gap, word, number in zip(fillers, words + [None], numbers + [None]):
        for _ in range(gap):
            length = rng.uniform(0.35, 1.0) * (c.w - 2 * m)
            c.rect(m, y + 3, m + length, y + 8, fill=GREY if rng.random() < 0.5 else LIGHT_GREY)
            y += FILLER_ROW
        if word is not None:
            c.text(indent, y + FIELD_ROW / 2, f"{word}: {number}", align="left")
            y += FIELD_ROW


def _draw_grid(c: Canvas, rng: random.Random, title: str, words: list[str], numbers: list[int]) -> None:
    """`_draw` on the token grid: the title in the top row of cells, then one row per field line
    ("Word:" and its number in the next cell after the colon) or per pair of grey filler lines."""
    m = 10
    rows = round(c.h / CELL)
    c.rect(3, 3, c.w - 3, c.h - 3, outline=LIGHT_GREY, width=2)
    if rng.random() < 0.5:
        c.text(m, CELL / 2, title, size=TITLE, align="left")
    else:
        c.text(c.w / 2, CELL / 2, title, size=TITLE)
    c.line([(m, CELL), (c.w - m, CELL)], fill=INK, width=2)

    # Field lines in order, with filler rows spread over the spare rows.
    fillers = [0] * (len(words) + 1)
    for _ in range(rows - 1 - len(words)):
        if rng.random() < 0.7:
            fillers[rng.randrange(len(fillers))] += 1
    row = 1
    indent = m + rng.choice((0, 4, 10))
    for gap, word, number in zip(fillers, words + [None], numbers + [None]):
        for _ in range(gap):
            for y in (row * CELL + 8, row * CELL + 20):
                length = rng.uniform(0.35, 1.0) * (c.w - 2 * m)
                c.rect(m, y, m + length, y + 5, fill=GREY if rng.random() < 0.5 else LIGHT_GREY)
            row += 1
        if word is not None:
            x0, _, x1, _ = c.text(indent, (row + 0.5) * CELL, f"{word}:", align="left")
            c.text((x1 // CELL + 1.5) * CELL, (row + 0.5) * CELL, str(number))
            row += 1

