"""Small copies of the language benchmarks in their public formats (FastChat's MT-Bench JSONL,
Hendrycks' MMLU CSVs, the MATH archive's JSON files, HumanEval's JSONL), written by the tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

MT_BENCH_QUESTIONS = [
    {"question_id": 81, "category": "writing",
     "turns": ["Write a haiku about rain.", "Now rewrite it as a limerick."]},
    {"question_id": 111, "category": "math",
     "turns": ["What is 2 + 3?", "And 2 * 3?"]},
    {"question_id": 121, "category": "coding",
     "turns": ["Write a Python function that adds two numbers.", "Add type hints."]},
]
MT_BENCH_REFERENCES = {
    111: ["2 + 3 = 5.", "2 * 3 = 6."],
    121: ["def add(a, b):\n    return a + b", "def add(a: int, b: int) -> int:\n    return a + b"],
}


def write_mt_bench(root: Path) -> Path:
    folder = root / "mt_bench"
    (folder / "reference_answer").mkdir(parents=True)
    (folder / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in MT_BENCH_QUESTIONS))
    (folder / "reference_answer" / "gpt-4.jsonl").write_text("".join(
        json.dumps({"question_id": qid, "answer_id": f"a{qid}", "model_id": "gpt-4",
                    "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0}) + "\n"
        for qid, turns in MT_BENCH_REFERENCES.items()))
    return folder


def _mmlu_row(subject: str, index: int, answer: str) -> list[str]:
    return [f"{subject} question {index}?", f"{subject} option a{index}", f"{subject} option b{index}",
            f"{subject} option c{index}", f"{subject} option d{index}", answer]


MMLU_TEST = {  # subject -> answers of its test questions
    "astronomy": ["B", "D"],
    "virology": ["A", "C"],
}


def write_mmlu(root: Path) -> Path:
    """Hendrycks' layout: data/dev/<subject>_dev.csv (5 rows) and data/test/<subject>_test.csv."""
    data = root / "mmlu" / "data"
    for split in ("dev", "test"):
        (data / split).mkdir(parents=True)
    for subject, answers in MMLU_TEST.items():
        with open(data / "dev" / f"{subject}_dev.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(_mmlu_row(subject, 100 + i, "ABCDA"[i]) for i in range(5))
        with open(data / "test" / f"{subject}_test.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(_mmlu_row(subject, i, answer) for i, answer in enumerate(answers))
    return data


MATH_PROBLEMS = [  # (subject folder, number, problem, level, type, solution)
    ("algebra", 1, "Compute half of one.", "Level 1", "Algebra", "Half of one is $\\boxed{\\frac{1}{2}}$."),
    ("algebra", 2, "What is 2 + 3?", "Level 2", "Algebra", "It is $\\boxed{5}$."),
    ("geometry", 1, "How many sides has a heptagon?", "Level 3", "Geometry", "A heptagon has $\\boxed{7}$ sides."),
    ("geometry", 2, "What is the area of a unit square?", "Level 3", "Geometry", "The area is $\\boxed{1}$."),
]


def write_math(root: Path) -> Path:
    base = root / "MATH"
    for folder, number, problem, level, kind, solution in MATH_PROBLEMS:
        path = base / "test" / folder / f"{number}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"problem": problem, "level": level, "type": kind, "solution": solution}))
    return base


HUMANEVAL_PROBLEMS = [
    {"task_id": "HumanEval/0", "entry_point": "add",
     "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Return a + b.\"\"\"\n",
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "HumanEval/1", "entry_point": "is_even",
     "prompt": "def is_even(n: int) -> bool:\n    \"\"\"Whether n is even.\"\"\"\n",
     "canonical_solution": "    return n % 2 == 0\n",
     "test": "def check(candidate):\n    assert candidate(2)\n    assert not candidate(3)\n"},
    {"task_id": "HumanEval/2", "entry_point": "largest",
     "prompt": "from typing import List\n\n\ndef largest(xs: List[int]) -> int:\n    \"\"\"The largest of xs.\"\"\"\n",
     "canonical_solution": "    return max(xs)\n",
     "test": "def check(candidate):\n    assert candidate([1, 5, 2]) == 5\n"},
]


def write_humaneval(root: Path) -> Path:
    path = root / "HumanEval.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in HUMANEVAL_PROBLEMS))
    return path
