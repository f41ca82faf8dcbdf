"""CPU benchmark: encoding training data at the start of `pixtral train`, three ways side by side.

    .venv/bin/python benchmarks/bench_train_data.py [--n 2000] [--workers 2]

On fresh synthetic data (`pixtral data synth --layout grid --questions all`, four to six questions
per image, and the one-image documents written with it), seconds per 1000 lines for:
  - per prefix: every prompt prefix of a conversation converted and encoded afresh by
    mistral-common, each image loaded and resized once per question (how `pixtral train` encoded
    chats until 2026-11-28);
  - once: `load_jsonl` with one process: each image loaded and resized once per conversation;
  - workers: `load_jsonl` with --workers forked processes.
The three give the same token ids (checked here on every line).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_training_data  # noqa: E402

from pixtral.assets import DEFAULT_MODEL_DIR  # noqa: E402
from pixtral.processing import Processor  # noqa: E402
from pixtral.processing.images import LOCAL_POLICY  # noqa: E402
from pixtral.train.data import load_jsonl  # noqa: E402


def per_prefix(path: Path, processor: Processor) -> list[list[int]]:
    """The ids of each chat line, every prefix encoded from scratch (no reuse of images)."""
    import json

    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    plain = MistralTokenizer.from_file(str(DEFAULT_MODEL_DIR / "tekken.json"))
    policy = replace(LOCAL_POLICY, base_dir=path.parent.resolve(), allow_remote=False)
    out = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        ids: list[int] = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            request = processor.to_request(messages[:i], policy)  # loads the images again
            ids = plain.encode_chat_completion(request).tokens  # and resizes them again
            ids = ids + processor.encode_text(msg["content"]) + [processor.eos_id]
        out.append(ids)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images (one conversation and one document each)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    processor = Processor.from_file(DEFAULT_MODEL_DIR / "tekken.json")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_training_data(Path(tmp) / "synth", args.n, questions="all", documents="ranked")
        rows = []
        for name in ("train.jsonl", "pretrain.jsonl"):
            path = data / name
            n_lines = sum(1 for _ in path.open())
            times, results = {}, {}
            if name == "train.jsonl":
                start = time.perf_counter()
                results["per prefix"] = per_prefix(path, processor)
                times["per prefix"] = time.perf_counter() - start
            for label, workers in (("once", 1), (f"{args.workers} workers", args.workers)):
                start = time.perf_counter()
                examples, _ = load_jsonl(path, processor, 10_000, workers=workers)
                times[label] = time.perf_counter() - start
                results[label] = [e.ids for e in examples]
            first = next(iter(results.values()))
            same = all(r == first for r in results.values())
            rows.append((name, n_lines, times, same))

    print(f"{args.n} images, {args.workers} workers; seconds per 1000 lines (lower is better)\n")
    labels = ["per prefix", "once", f"{args.workers} workers"]
    print("| file | lines | " + " | ".join(labels) + " | same ids |")
    print("|---|---|" + "---|" * len(labels) + "---|")
    for name, n_lines, times, same in rows:
        cells = [f"{1000 * times[k] / n_lines:.2f}" if k in times else "-" for k in labels]
        print(f"| {name} | {n_lines} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    if not all(same for *_, same in rows):
        sys.exit("the ways gave different ids")


if __name__ == "__main__":
    main()
