"""What are a model's wrong answers to the lookup questions? Sort them by where they come from.

    .venv/bin/python scripts/answer_errors.py --data runs/synth_grid_heldout \
        --items runs/eval_default_model/synth.items.jsonl

`--items` is what `pixtral eval synth --data DIR` wrote; each record's image is generated again from
the data set's manifest (seed, layout), which gives the facts of the page. For each lookup template:
  tables.cell      a wrong value: from column C (the one asked), from row R, both or neither;
  tables.largest   a wrong item: one of the table's items or not;
  documents.after  a wrong number: another field's number on the page or not;
  documents.which  a wrong word: one of the page's field words or not.
An answer that is always a value of the right column but of any row shows a model that finds the
column and not the row.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

from pixtral.data.synth import generate_sample

TEMPLATES = ("tables.cell", "tables.largest", "documents.after", "documents.which")


def table_facts(description: str) -> tuple[list[str], dict[str, list[str]]]:
    """'Table, 3 items, columns A M. Salt: 6 2. Soup: 3 6.' -> (['A', 'M'], {'Salt': ['6', '2'], ...})."""
    columns = re.search(r"columns ([A-Z ]+)\.", description).group(1).split()
    rows = {item: values.split() for item, values in re.findall(r"(\w+): ([\d ]+)\.", description)}
    return columns, rows


def kind_of_error(template: str, question: str, answer: str, description: str) -> str:
    if template == "tables.cell":
        item, column = re.match(r"What is the value for (\w+) in column (\w)", question).groups()
        columns, rows = table_facts(description)
        in_column = answer in [values[columns.index(column)] for values in rows.values()]
        in_row = answer in rows[item]
        return {(True, True): "in column C and row R", (True, False): "in column C not row R",
                (False, True): "in row R not column C", (False, False): "in neither"}[in_column, in_row]
    if template == "tables.largest":
        return "an item of the table" if answer in table_facts(description)[1] else "not an item of the table"
    fields = dict(re.findall(r"(\w+): (\d)\.", description))
    if template == "documents.after":
        return "another field's number" if answer in fields.values() else "not a number on the page"
    return "another field word" if answer in fields else "not a field word on the page"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder written by `pixtral data synth`")
    ap.add_argument("--items", type=Path, required=True, help="synth.items.jsonl written by `pixtral eval synth`")
    args = ap.parse_args()
    for path in (args.data / "manifest.json", args.data / "test.jsonl", args.items):
        if not path.is_file():
            sys.exit(f"error: {path} not found")
    manifest = json.loads((args.data / "manifest.json").read_text())
    records = {r["id"]: r for r in map(json.loads, (args.data / "test.jsonl").read_text().splitlines())}

    counts: dict[str, collections.Counter] = {t: collections.Counter() for t in TEMPLATES}
    for line in args.items.read_text().splitlines():
        item = json.loads(line)
        record_id, turn = item["id"].rsplit(":", 1)
        record = records.get(record_id)
        if record is None:
            sys.exit(f"error: {args.items} has item {item['id']!r}, which {args.data / 'test.jsonl'} does not hold: "
                     "were the items scored on another data set?")
        template = record["templates"][int(turn)]
        if template not in counts:
            continue
        answer = (item.get("answer") or "").strip()
        if item["scores"]["baseline"]:
            counts[template]["right"] += 1
            continue
        image = record["messages"][0]["content"][0]["image_url"]["url"]
        sample = generate_sample(manifest["seed"], int(Path(image).stem), record["category"],
                                 manifest["layout"], manifest["questions"])
        questions = [m for m in record["messages"] if m["role"] == "user"]
        content = questions[int(turn)]["content"]
        question = content if isinstance(content, str) else content[-1]["text"]
        counts[template][kind_of_error(template, question, answer, sample.description)] += 1

    print("| template | questions | right | wrong answers, by where they come from |\n|---|---|---|---|")
    for template, c in counts.items():
        total = sum(c.values())
        kinds = "; ".join(f"{kind} {n}" for kind, n in c.most_common() if kind != "right")
        print(f"| {template} | {total} | {c['right']} | {kinds} |")


if __name__ == "__main__":
    main()
