"""What a category generator returns, and how it picks the questions to ask."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

from PIL import Image

# Share of conversations with two or three question/answer turns about one image.
MULTI_TURN_RATE = 0.35


@dataclass(frozen=True)
class Turn:
    template: str  # "<category>.<template>", e.g. "charts.tallest"
    question: str
    answer: str  # one word or one number


@dataclass
class Sample:
    """One image with the questions asked about it, in order."""

    category: str
    image: Image.Image
    turns: list[Turn] = field(default_factory=list)
    # Everything a question could ask about, in reading order ("Bar chart Sales: A 3, C 7."):
    # the text of the interleaved pre-training documents, which supervise every part of the
    # image at once instead of the one or two facts a question asks for.
    description: str = ""
    # The same facts with the key first and in random order ("Bar chart Sales, 3 bars: C 7, A 4,
    # D 1."): the text of the pre-training documents. In reading order a value can be read off by
    # position alone; in random order each value must be found from the key just written, which
    # is the lookup the questions ask for ("What is the value of bar C?").
    lookup: str = ""
    # The facts a comparison asks about, largest first ("Bar chart Sales, 3 bars, from tallest: C 7,
    # A 4, D 1."): each next item is the largest of those left, the step "Which bar is the
    # tallest?" takes once. Categories without comparisons repeat `lookup`.
    ranked: str = ""

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def shuffled(rng: random.Random, items: list[str]) -> list[str]:
    """A copy of `items` in random order."""
    items = list(items)
    rng.shuffle(items)
    return items


def choose_plan(rng: random.Random, single: tuple[str, ...], multi: tuple[tuple[str, ...], ...],
                every: tuple[tuple[str, ...], ...] | None = None) -> tuple[str, ...]:
    """The templates to ask, in order: one template, or (MULTI_TURN_RATE of the time) a
    multi-turn combination.

    With `every` (a category's EVERY plans, for `questions="all"` training data), one of those
    plans in random order instead: every template of the category about one image, so that each
    image's tokens, the bulk of a sample's cost, pay for several answers instead of one or two.
    Such conversations may give one answer away in another (a chart's values and its tallest
    bar), which is why evaluation data never uses them.

    Each category lists only combinations whose answers are independent of one another,
    so earlier turns in the history never give away a later answer (a model shown a
    blank image must not beat guessing). Single-turn templates are weighted so that,
    counting the multi-turn ones, templates come up about equally often.
    """
    if every is not None:
        return tuple(shuffled(rng, list(rng.choice(every))))
    if multi and rng.random() < MULTI_TURN_RATE:
        return rng.choice(multi)
    return (rng.choices(single, weights=_single_weights(single, multi))[0],)


@lru_cache(maxsize=None)
def _single_weights(single: tuple[str, ...], multi: tuple[tuple[str, ...], ...]) -> tuple[float, ...]:
    rate = MULTI_TURN_RATE if multi else 0.0
    # Expected uses per conversation of each template in multi-turn conversations.
    used = {t: rate * sum(plan.count(t) for plan in multi) / max(1, len(multi)) for t in single}
    active = list(single)  # a list, not a set: the float sums must not depend on hash order
    while True:  # equalise (1 - rate) * p_t + used_t, dropping templates already over the level
        level = ((1 - rate) + sum(used[t] for t in active)) / len(active)
        over = [t for t in active if used[t] > level]
        if not over:
            break
        active = [t for t in active if t not in over]
    balanced = [max(0.0, level - used[t]) if t in active else 0.0 for t in single]
    # Mix in some uniform weight so every template is also asked on its own.
    return tuple(0.8 * b / sum(balanced) + 0.2 / len(single) for b in balanced)
