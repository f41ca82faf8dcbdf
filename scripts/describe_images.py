"""How well does a model read an image? Ask it to describe held-out images, score the words.

    .venv/bin/python scripts/describe_images.py --data DIR [--model PATH] [--limit N]

DIR is a folder written by `pixtral data synth` (its `pretrain.jsonl` holds one description per
image of its train split, e.g. "Bar chart Visits, 2 bars: G 4, H 5."). Write one from a seed never
used in training, e.g. `pixtral data synth --out runs/describe_heldout --n 1700 --seed 3 --val-frac 0
--test-frac 0.6`. The model sees only the image (the document's prompt: BOS, then the image) and
continues greedily; its text is compared with the reference word by word, in order:

  - exact: the whole description right;
  - words: reference words matched at the same position in the model's description;
  - labels and values: the same, over the words that are a single letter or a number (bar and
    point labels, table cells, values), which can only come from reading small glyphs;
  - names: over the other words after the first (titles, colours, shapes, item names).

The questions of `pixtral eval synth` ask for one of these facts at a time; a model that cannot
write them down from the image cannot answer them either.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

from pixtral import LLM, SamplingParams

WORD = re.compile(r"[A-Za-z]+|\d+")


def words(text: str) -> list[str]:
    return WORD.findall(text)


def is_glyph_fact(word: str) -> bool:
    return word.isdigit() or (len(word) == 1 and word.isalpha())


# Clause boundaries: ", " and ". ", and ": " unless a number follows ("Floor: 3" is one fact).
CLAUSE = re.compile(r"[.,](?:\s+|$)|:\s+(?!\d)")


def facts(text: str) -> collections.Counter:
    """The clauses of a description as word tuples; "3 follows Floor" is the fact "Floor: 3"."""
    found: collections.Counter = collections.Counter()
    for clause in CLAUSE.split(text.strip()):
        w = words(clause)
        if len(w) == 3 and w[1] == "follows":
            w = [w[2], w[0]]
        if w:
            found[tuple(w)] += 1
    return found


def score(reference: str, prediction: str) -> dict[str, tuple[int, int]]:
    """(right, total) for each measure of one description."""
    ref, pred = words(reference), words(prediction)
    right = [i < len(pred) and pred[i] == w for i, w in enumerate(ref)]
    glyph = [r for w, r in zip(ref, right) if is_glyph_fact(w)]
    names = [r for i, (w, r) in enumerate(zip(ref, right)) if i > 0 and not is_glyph_fact(w)]
    ref_facts, pred_facts = facts(reference), facts(prediction)
    stated = ref_facts & pred_facts
    glyphs_in = lambda c: sum(n for f, n in c.items() if any(map(is_glyph_fact, f)))  # noqa: E731
    return {"exact": (int(ref == pred), 1), "words": (sum(right), len(right)),
            "labels and values": (sum(glyph), len(glyph)), "names": (sum(names), len(names)),
            "facts": (sum(stated.values()), sum(ref_facts.values())),
            "glyph facts": (glyphs_in(stated), glyphs_in(ref_facts))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder written by `pixtral data synth`")
    ap.add_argument("--model", help="checkpoint folder (default: the embedded default model)")
    ap.add_argument("--limit", type=int, default=300, help="descriptions to score (default 300)")
    ap.add_argument("--show", type=int, default=0, help="print this many descriptions next to their references")
    args = ap.parse_args()

    docs_path = args.data / "pretrain.jsonl"
    if not docs_path.is_file():
        sys.exit(f"{docs_path}: not found (write the folder with `pixtral data synth`)")
    docs = [json.loads(line) for line in docs_path.read_text().splitlines()[: args.limit]]
    llm = LLM(args.model) if args.model else LLM()
    prompts, refs = [], []
    for doc in docs:
        image = next(p for p in doc["content"] if p["type"] == "image_url")
        url = str(args.data / image["image_url"]["url"])
        ids, images, _ = llm.processor.encode_document([{"type": "image_url", "image_url": {"url": url}}])
        prompts.append({"prompt_token_ids": ids, "images": images})
        refs.append(" ".join(p["text"] for p in doc["content"] if p["type"] == "text"))
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=96))

    totals: dict[str, dict[str, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    for doc, ref, out in zip(docs, refs, outputs):
        text = out.outputs[0].text
        for group in (doc["category"], "overall"):
            for measure, (right, total) in score(ref, text).items():
                totals[group][measure][0] += right
                totals[group][measure][1] += total
    for doc, ref, out in list(zip(docs, refs, outputs))[: args.show]:
        print(f"{doc['id']}\n  reference: {ref}\n  model:     {out.outputs[0].text}")
    measures = ["exact", "words", "labels and values", "names", "facts", "glyph facts"]
    print(f"{len(docs)} descriptions from {docs_path}, model {args.model or 'default'}\n")
    print("| category | " + " | ".join(measures) + " |")
    print("|---" * (len(measures) + 1) + "|")
    for group in sorted(totals, key=lambda g: (g == "overall", g)):
        cells = [f"{100 * r / t:.1f}%" if t else "-" for r, t in (totals[group][m] for m in measures)]
        print(f"| {group} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
