"""The MATH test set (Hendrycks et al.) from its public files: the full 5000 or the MATH-500 subset.

Accepted layouts:
  - the MATH archive's folder: `test/<subject>/<n>.json` (or a folder holding `MATH/test/...`), each
    file `{"problem", "level": "Level 3", "type": "Algebra", "solution"}`; the answer is the
    solution's last `\\boxed{}`;
  - a JSONL file such as MATH-500's `test.jsonl` (PRM800K / HuggingFaceH4/MATH-500):
    `{"problem", "solution", "answer", "subject", "level": 3, "unique_id": "test/algebra/1.json"}`,
    where `answer` may be absent (then the solution's last box), as may `subject`/`level`.

Item ids are the MATH file path (`test/algebra/1.json`), as MATH-500's `unique_id`s are, so the two
runs name the same problem alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from pixtral.eval.data import Dataset, Item, hash_files, read_jsonl
from pixtral.eval.errors import DataError

# Zero-shot chain of thought with the boxed answer: the instruction most instruction-tuned models are
# evaluated with on MATH (Qwen2.5-Math, DeepSeek-Math, simple-evals ask for the same \boxed{} ending).
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def prompt(problem: str) -> str:
    return f"{problem.strip()}\n\n{INSTRUCTION}"


def _level(value: Any) -> str:
    """'Level 3' or 3 -> '3' (the archive has a few 'Level ?': kept as '?')."""
    text = str(value).strip()
    return text[len("Level "):].strip() if text.startswith("Level ") else text


def _item(item_id: str, record: dict[str, Any], where: str) -> Item:
    from pixtral.eval import math_answers

    problem = record.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: field 'problem' is missing or empty")
    answer = record.get("answer")
    if answer is None:
        solution = record.get("solution")
        if not isinstance(solution, str):
            raise DataError(f"{where}: needs field 'answer' or 'solution'")
        try:
            answer = math_answers.reference_answer(solution)
        except ValueError:
            raise DataError(f"{where}: field 'solution' has no \\boxed{{}} answer") from None
    subject = record.get("subject", record.get("type"))
    meta = {"level": _level(record["level"]) if record.get("level") is not None else "?",
            "subject": str(subject) if subject is not None else "?"}
    return Item(item_id, [{"role": "user", "content": prompt(problem)}], str(answer), meta)


def _folder_files(root: Path) -> tuple[Path, list[Path]]:
    for base in (root / "test", root / "MATH" / "test", root):
        files = sorted(base.glob("*/*.json"), key=lambda p: (p.parent.name, _number(p.stem)))
        if files:
            return base, files
    raise DataError(f"{root}: no MATH problems here (expected test/<subject>/<n>.json files or a .jsonl file)")


def _number(stem: str) -> tuple[int, str]:
    return (int(stem), "") if stem.isdigit() else (1 << 62, stem)


def load(path: str | Path, limit: int | None = None) -> Dataset:
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory (pass the MATH folder or MATH-500's test.jsonl with --data)")
    if root.is_file():
        return _load_jsonl(root, limit)
    base, every = _folder_files(root)
    digest = hash_files(every, base)  # of the whole set, so --limit does not change what a run resumes
    files = every[:limit] if limit is not None else every

    def stream() -> Iterator[Item]:
        for file in files:
            where = str(file)
            try:
                record = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"{where}: cannot read as JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object")
            yield _item(f"test/{file.parent.name}/{file.name}", record, where)

    return Dataset("math", files, digest, len(files), len(files), stream)


def _load_jsonl(path: Path, limit: int | None) -> Dataset:
    records = read_jsonl(path)[:limit]
    if not records:
        raise DataError(f"{path}: no problems in this file")

    def stream() -> Iterator[Item]:
        for number, record in records:
            item_id = str(record.get("unique_id") or f"line-{number}")
            yield _item(item_id, record, f"{path} line {number}")

    return Dataset("math", [path], hash_files([path]), len(records), len(records), stream)
