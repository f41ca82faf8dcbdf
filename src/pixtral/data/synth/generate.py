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
# "some": one question, or a few whose answers do not give one another away (held-out data);
# "all": every question template of the category about each image (training data).
QUESTION_SETS = ("some", "all")


def generate_sample(seed: int, index: int = 0, category: str | None = None, layout: str = "free",
                    questions: str = "some") -> Sample:
    """Generate sample `index` of the data set with `seed`.

    `category` defaults to the round-robin choice CATEGORIES[index % 5]. `layout` "grid" puts
    every label, value and object in the default model's token cells (`draw.CELL`); "free"
    anywhere. `questions` is one of QUESTION_SETS; "all" draws from its own random stream, so its
    images are new ones, not those of "some" with more questions. The same arguments always give
    the same image (pixel for pixel) and the same turns.
    """
    if category is None:
        category = CATEGORIES[index % len(CATEGORIES)]
    if category not in GENERATORS:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if questions not in QUESTION_SETS:
        raise ValueError(f"unknown question set {questions!r}; expected one of {', '.join(QUESTION_SETS)}")
    # Each layout and question set draws from a stream of its own; the free layout's is the original.
    stream = category if layout == "free" else f"{category}/{layout}"
    if questions == "all":
        stream += "/all"
    return GENERATORS[category](sample_rng(seed, index, stream), grid=layout == "grid", every=questions == "all")
