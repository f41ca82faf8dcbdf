"""MMLU (Hendrycks et al., "Measuring Massive Multitask Language Understanding"), 5-shot, for chat models.

The prompt is the standard one of `hendrycks/test` `evaluate.py` (`gen_prompt` + `format_example`): a header
naming the subject, the subject's first five `dev` questions with their answers, then the test question
ending in "Answer:". Here it is sent as one user message; the model's reply is scored with
`extract_letter` (generated answer) or `letter_from_top_logprobs` (first token's top log-probabilities,
the original paper's method when the server returns them).

Data is read from either local copy:

* Hendrycks' original tarball (`data.tar`): a folder with `dev/<subject>_dev.csv` and
  `test/<subject>_test.csv` (or the same under `data/`); no header; columns question, A, B, C, D, answer.
* Hugging Face `cais/mmlu` parquet: `all/dev-*.parquet` and `all/test-*.parquet` with columns
  question, subject, choices (4 strings), answer (0-3).

Items come in subject order (sorted by name, as `evaluate.py` does), then in the subject's row order.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pixtral.eval.data import Dataset, Item, hash_files, iter_rows, resolve_table_files
from pixtral.eval.errors import DataError

LETTERS = ("A", "B", "C", "D")
N_SHOTS = 5
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"

# Hendrycks' categories.py: subject -> subcategory, and subcategory -> category.
_SUBCATEGORIES = {
    "abstract_algebra": "math",
    "anatomy": "health",
    "astronomy": "physics",
    "business_ethics": "business",
    "clinical_knowledge": "health",
    "college_biology": "biology",
    "college_chemistry": "chemistry",
    "college_computer_science": "computer science",
    "college_mathematics": "math",
    "college_medicine": "health",
    "college_physics": "physics",
    "computer_security": "computer science",
    "conceptual_physics": "physics",
    "econometrics": "economics",
    "electrical_engineering": "engineering",
    "elementary_mathematics": "math",
    "formal_logic": "philosophy",
    "global_facts": "other",
    "high_school_biology": "biology",
    "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science",
    "high_school_european_history": "history",
    "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math",
    "high_school_microeconomics": "economics",
    "high_school_physics": "physics",
    "high_school_psychology": "psychology",
    "high_school_statistics": "math",
    "high_school_us_history": "history",
    "high_school_world_history": "history",
    "human_aging": "health",
    "human_sexuality": "culture",
    "international_law": "law",
    "jurisprudence": "law",
    "logical_fallacies": "philosophy",
    "machine_learning": "computer science",
    "management": "business",
    "marketing": "business",
    "medical_genetics": "health",
    "miscellaneous": "other",
    "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy",
    "nutrition": "health",
    "philosophy": "philosophy",
    "prehistory": "history",
    "professional_accounting": "other",
    "professional_law": "law",
    "professional_medicine": "health",
    "professional_psychology": "psychology",
    "public_relations": "politics",
    "security_studies": "politics",
    "sociology": "culture",
    "us_foreign_policy": "politics",
    "virology": "health",
    "world_religions": "philosophy",
}
_CATEGORIES = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other": ("other", "business", "health"),
}
CATEGORIES = tuple(_CATEGORIES)
# The 57 subjects -> STEM / humanities / social sciences / other.
SUBJECT_CATEGORIES: dict[str, str] = {
    subject: next(cat for cat, subs in _CATEGORIES.items() if sub in subs)
    for subject, sub in _SUBCATEGORIES.items()
}


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"


# ------------------------------------------------------------------------------------- prompts


def format_subject(subject: str) -> str:
    """`high_school_us_history` -> `high school us history`.

    (Hendrycks' `format_subject` prepends a space to every word, which doubles the space after "about";
    we use the intended single space, as lm-evaluation-harness does.)
    """
    return " ".join(part for part in subject.split("_") if part)


def format_example(q: Question, include_answer: bool = True) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    text += "\nAnswer:"
    if include_answer:
        text += f" {q.answer}\n\n"
    return text


def gen_prompt(subject: str, shots: list[Question], question: Question) -> str:
    """The 5-shot prompt: header, the dev examples with answers, the test question ending in "Answer:"."""
    return (HEADER.format(subject=format_subject(subject)) + "".join(format_example(s) for s in shots)
            + format_example(question, include_answer=False))


# ---------------------------------------------------------------------------------------- load


def load(path: str | Path, limit: int | None = None) -> Dataset:
    """MMLU from Hendrycks' CSV folders or `cais/mmlu` parquet; see the module docstring."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory (pass MMLU's local copy with --data)")
    csv_dirs = _csv_dirs(root) if root.is_dir() else None
    if csv_dirs is not None:
        files, dev, test = _read_csv_layout(*csv_dirs)
    elif root.is_dir():
        files, dev, test = _read_parquet_layout(root)
    else:
        raise DataError(f"{root}: expected MMLU's folder (dev/ and test/ CSV folders, or the cais/mmlu "
                        "snapshot with all/dev-*.parquet and all/test-*.parquet), not a file")

    plan: list[tuple[str, int, Question]] = []
    shots: dict[str, list[Question]] = {}
    for subject in sorted(test):
        examples, where = dev.get(subject, ([], None))
        if len(examples) < N_SHOTS:
            found = f"found {len(examples)}" + (f" in {where}" if where else "")
            raise DataError(f"MMLU subject '{subject}': needs at least {N_SHOTS} dev rows for the 5-shot prompt "
                            f"({found}; test file {test[subject][1]})")
        shots[subject] = examples[:N_SHOTS]
        plan.extend((subject, i, q) for i, q in enumerate(test[subject][0]))
    if not plan:
        raise DataError(f"{root}: no MMLU test questions found")
    if limit is not None:
        plan = plan[:max(0, limit)]

    def stream() -> Iterator[Item]:
        for subject, index, q in plan:
            yield Item(
                id=f"{subject}/{index}",
                messages=[{"role": "user", "content": gen_prompt(subject, shots[subject], q)}],
                reference=q.answer,
                meta={"subject": subject},
            )

    return Dataset(task="mmlu", files=files, sha256=hash_files(files, root), total=len(plan),
                   records=len(plan), stream=stream)


_Split = dict[str, tuple[list[Question], Path]]


def _csv_dirs(root: Path) -> tuple[Path, Path] | None:
    for base in (root, root / "data"):
        if (base / "dev").is_dir() and (base / "test").is_dir():
            return base / "dev", base / "test"
    return None


def _read_csv_layout(dev_dir: Path, test_dir: Path) -> tuple[list[Path], _Split, _Split]:
    dev_files = sorted(dev_dir.glob("*_dev.csv"))
    test_files = sorted(test_dir.glob("*_test.csv"))
    if not test_files:
        raise DataError(f"{test_dir}: no <subject>_test.csv files")
    test = {f.name[: -len("_test.csv")]: (_read_csv(f), f) for f in test_files}
    dev = {f.name[: -len("_dev.csv")]: (_read_csv(f), f) for f in dev_files}
    for subject in test:
        if subject not in dev:
            raise DataError(f"MMLU subject '{subject}': no dev file {dev_dir / (subject + '_dev.csv')} "
                            f"for the 5-shot prompt (test file {test[subject][1]})")
    used = [dev[s][1] for s in sorted(test)] + [test[s][1] for s in sorted(test)]
    return used, dev, test


def _read_csv(path: Path) -> list[Question]:
    questions = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            index = 0
            while True:
                line = reader.line_num + 1
                try:
                    record = next(reader)
                except StopIteration:
                    break
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue  # blank line
                where = f"{path} row {index} (line {line})"
                if len(record) != 6:
                    raise DataError(f"{where}: expected 6 columns (question, A, B, C, D, answer), "
                                    f"found {len(record)}")
                answer = record[5].strip()
                if answer not in LETTERS:
                    raise DataError(f"{where} field 'answer': expected one of A, B, C, D, got {record[5]!r}")
                questions.append(Question(record[0], tuple(record[1:5]), answer))  # type: ignore[arg-type]
                index += 1
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as CSV ({exc})") from exc
    return questions


def _read_parquet_layout(root: Path) -> tuple[list[Path], _Split, _Split]:
    dev_files = resolve_table_files(root, "dev", config="all")
    test_files = resolve_table_files(root, "test", config="all")
    return dev_files + test_files, _read_table(dev_files), _read_table(test_files)


def _read_table(files: list[Path]) -> _Split:
    by_subject: _Split = {}
    for row in iter_rows(files, ["question", "subject", "choices", "answer"]):
        question = row.required("question")
        subject = row.required("subject")
        if not isinstance(question, str):
            raise DataError(f"{row.where('question')}: expected a string, got {type(question).__name__}")
        if not isinstance(subject, str) or not subject.strip():
            raise DataError(f"{row.where('subject')}: expected a subject name, got {subject!r}")
        choices = row.required("choices")
        if not isinstance(choices, (list, tuple)) or len(choices) != 4:
            count = len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__
            raise DataError(f"{row.where('choices')}: expected a list of 4 choices, got {count}")
        answer = row.required("answer")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3:
            raise DataError(f"{row.where('answer')}: expected an integer 0-3, got {answer!r}")
        q = Question(question, tuple("" if c is None else str(c) for c in choices),  # type: ignore[arg-type]
                     LETTERS[answer])
        by_subject.setdefault(subject, ([], row.path))[0].append(q)
    return by_subject


# ------------------------------------------------------------------------------------- scoring

_CONNECTORS = frozenset(
    "is was seems appears looks would should must could might fits matches because since as and or but nor "
    "so then though vs versus also too".split()
)
_LETTER = r"(?<![A-Za-z0-9])([A-D])(?![A-Za-z0-9])"
_EXPLICIT = (
    re.compile(r"(?i:\banswer\b)[^A-Za-z0-9\n]{0,3}(?:(?i:is|would be|will be|should be|must be)\s*)?"
               r"(?:[:\-]\s*)?(?:(?i:option|choice)\s*)?[(\[]?\s*([A-D])(?![A-Za-z0-9])"),
    re.compile(r"\\boxed\{\s*(?:\\text\{\s*)?([A-D])\s*\}"),
)
_LEADING = re.compile(r"[(\[]?\s*([A-D])\s*(?:[.:)\]]|(?=\s)|$)")
_ALTERNATIVE = re.compile(r"[)\]]?\s*(?:(?i:or|and|vs\.?|versus)\s|/|,|&)\s*[(\[]?[A-D](?![A-Za-z0-9])")


def _is_article(text: str, end: int) -> bool:
    """Whether the "A" ending at `end` reads as the English article ("A cell wall ...")."""
    if text[end - 1] != "A":
        return False
    follow = re.match(r"\s+([a-z][a-z'-]*)", text[end:])
    return bool(follow) and follow.group(1) not in _CONNECTORS


def extract_letter(answer: str) -> str | None:
    """The option letter (A-D) a chat model's generated answer gives, or None.

    Markdown emphasis (`*`, `_`) is removed first. Then:

    1. Explicit statements: "answer is B", "The correct answer is (B)", "Answer: B", "answer would be
       option C", `\\boxed{B}`; together with
    2. a leading letter: the answer starts with "B", "B.", "(B)", "[B]", "B:", "B) text", "B text"
       ("A or B", "B/C", "C, D" at the start give None: two alternatives, no answer).
       If the letters from 1 and 2 agree, that letter; if they disagree ("B. ... the answer is C"), None.
    3. Otherwise a lone standalone letter: if every standalone capital A-D in the text is the same letter
       ("I'd pick C."), that letter; two different ones ("A or B", "I think C... no, D") give None:
       we do not guess which of several letters the model meant, self-corrections included.

    Letters must be capitals. An "A" followed by a lowercase word is read as the article ("A cell ..."),
    unless that word is a verb or conjunction such as "is", "or", "because" ("A is correct", "A or B").
    Never raises; None also for empty or non-string input.
    """
    if not isinstance(answer, str):
        return None
    text = answer.replace("*", "").replace("_", "").strip()
    if not text:
        return None
    found = set()
    for pattern in _EXPLICIT:
        for m in pattern.finditer(text):
            if not _is_article(text, m.end(1)):
                found.add(m.group(1))
    lead = _LEADING.match(text)
    if lead and not _is_article(text, lead.end(1)):
        if _ALTERNATIVE.match(text, lead.end(1)):
            return None  # "A or B", "B/C", "C, D"
        found.add(lead.group(1))
    if not found:
        found = {m.group(1) for m in re.finditer(_LETTER, text) if not _is_article(text, m.end(1))}
    return found.pop() if len(found) == 1 else None


def letter_from_top_logprobs(top: list[tuple[str, float]] | None) -> tuple[str | None, dict[str, float]]:
    """The letter with the highest log-probability among the first generated token's top alternatives.

    `top` is [(token text, logprob), ...]. A token counts for a letter when its text, stripped of
    whitespace, is exactly that capital letter ("B" and " B" both count for B); each letter keeps its best
    logprob. Returns (argmax letter, {letter: best logprob}) for the letters present; (None, {}) when no
    letter appears. Ties go to the earlier letter (A before B before C before D). Malformed entries and
    NaN logprobs are skipped.
    """
    best: dict[str, float] = {}
    for entry in top or ():
        try:
            token, logprob = entry[0], float(entry[1])
        except (TypeError, ValueError, IndexError):
            continue
        if not isinstance(token, str) or math.isnan(logprob):
            continue
        letter = token.strip()
        if letter in LETTERS and (letter not in best or logprob > best[letter]):
            best[letter] = logprob
    ordered = {letter: best[letter] for letter in LETTERS if letter in best}
    winner = None
    for letter, logprob in ordered.items():
        if winner is None or logprob > ordered[winner]:
            winner = letter
    return winner, ordered


def category_of(subject: str) -> str | None:
    """The subject's category (STEM / humanities / social sciences / other), None if unknown."""
    return SUBJECT_CATEGORIES.get(subject)
