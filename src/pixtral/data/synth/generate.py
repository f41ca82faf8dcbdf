"""One sample from (seed, index, category): the deterministic entry point."""

from __future__ import annotations

import hashlib
import random

from pixtral.data.synth import charts, diagrams, documents, scenes, tables
from pixtral.data.synth.base import Sample

# MM-MT-Bench's five image categories, in the order used for round-robin assignment.
GENERATORS = {
    "charts": charts.generate,
    "tables": tables.generate,
    "documents": documents.generate,
    "diagrams": diagrams.generate,
    "misc": scenes.generate,
}
CATEGORIES: tuple[str, ...] = tuple(GENERATORS)
# Bump when the images or questions a (seed, index, category) gives change.
GENERATOR_VERSION = "1"


def sample_rng(seed: int, index: int, category: str) -> random.Random:
    """The random stream of one sample: independent of every other sample, the same on
    every platform and Python version."""
    key = f"pixtral-synth/{GENERATOR_VERSION}/{seed}/{index}/{category}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:16], "big"))


LAYOUTS = ("free", "grid")


def generate_sample(seed: int, index: int = 0, category: str | None = None, layout: str = "free") -> Sample:
    """Generate sample `index` of the data set with `seed`.

    `category` defaults to the round-robin choice CATEGORIES[index % 5]. `layout` "grid" puts
    every label, value and object in the default model's token cells (`draw.CELL`); "free"
    anywhere. The same arguments always give the same image (pixel for pixel) and the same turns.
    """
    if category is None:
        category = CATEGORIES[index % len(CATEGORIES)]
    if category not in GENERATORS:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "free":  # the original stream, unchanged
        return GENERATORS[category](sample_rng(seed, index, category))
    return GENERATORS[category](sample_rng(seed, index, f"{category}/{layout}"), grid=True)
