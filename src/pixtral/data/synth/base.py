"""What a category generator returns, and how it picks the questions to ask."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

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

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def choose_plan(rng: random.Random, single: tuple[str, ...], multi: tuple[tuple[str, ...], ...]) -> tuple[str, ...]:
    """The templates to ask, in order: one template, or (MULTI_TURN_RATE of the time) a
    multi-turn combination.

    Each category lists only combinations whose answers are independent of one another,
    so earlier turns in the history never give away a later answer (a model shown a
    blank image must not beat guessing).
    """
    if multi and rng.random() < MULTI_TURN_RATE:
        return rng.choice(multi)
    return (rng.choice(single),)
