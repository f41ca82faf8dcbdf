"""Synthetic chat data about generated images, for training and evaluating small Pixtral models.

`pixtral data synth --out DIR --n N --seed S` (see `pixtral.data.synth.writer`) writes
DIR/images/*.png, DIR/{train,val,test}.jsonl (chat), DIR/pretrain.jsonl (one interleaved
document per training image: the image and its description) and DIR/manifest.json. Images cover
MM-MT-Bench's five image categories (charts, tables, documents, diagrams, misc); every
question has a short exact answer (one word or one number) read from the image.

    from pixtral.data.synth import generate_sample
    sample = generate_sample(seed=0, index=3, category="charts")
    sample.image              # PIL.Image.Image
    sample.turns              # [Turn(template, question, answer), ...]
    sample.description        # "Bar chart Sales, 3 bars: A 4, C 7, D 1."
    sample.lookup             # the same facts in random order: "Bar chart Sales, 3 bars: C 7, A 4, D 1."
    sample.ranked             # largest first: "Bar chart Sales, 3 bars, from tallest: C 7, A 4, D 1."
    generate_sample(0, 3, "charts", layout="grid")  # every label and value in one image token
"""

from pixtral.data.synth.base import Sample, Turn
from pixtral.data.synth.generate import CATEGORIES, GENERATOR_VERSION, generate_sample
from pixtral.data.synth.writer import SynthConfig, conversation, split_counts, write_dataset

__all__ = [
    "CATEGORIES",
    "GENERATOR_VERSION",
    "Sample",
    "SynthConfig",
    "Turn",
    "conversation",
    "generate_sample",
    "split_counts",
    "write_dataset",
]
