"""Exact-match accuracy of a model on a drill's chat.jsonl (one question per image, answer one word).

    .venv/bin/python research/scripts/drill_accuracy.py --data runs/aligned_lookup/val --model runs/aligned_lookup/run/final/mistral

Greedy answers, compared after stripping whitespace (research/scripts/glyph_lookup_data.py writes such files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pixtral import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with chat.jsonl and its images")
    ap.add_argument("--model", help="checkpoint folder (default: the embedded default model)")
    args = ap.parse_args()
    path = args.data / "chat.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: not found (write it with research/scripts/glyph_lookup_data.py)")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    conversations = []
    for record in records:
        content = [dict(part, image_url={"url": str(args.data / part["image_url"]["url"])})
                   if part["type"] == "image_url" else part for part in record["messages"][0]["content"]]
        conversations.append([{"role": "user", "content": content}])
    llm = LLM(args.model) if args.model else LLM()
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=8))
    right = sum(out.outputs[0].text.strip() == rec["messages"][1]["content"] for out, rec in zip(outputs, records))
    print(f"{right}/{len(records)} = {100 * right / len(records):.1f}% exact ({path}, model {args.model or 'default'})")


if __name__ == "__main__":
    main()
