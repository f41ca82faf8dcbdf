"""FastChat's text MT-Bench: 80 two-turn questions, single-answer grading by an LLM judge.

Protocol as in lm-sys/FastChat `fastchat/llm_judge` (read at commit 0e6d3e4beaab66f4d3f93db72541a4abab8af28d):
- questions: `data/mt_bench/question.jsonl` (`question_id`, `category`, `turns`); reference answers for
  the categories in `common.NEED_REF_CATS` from `data/mt_bench/reference_answer/gpt-4.jsonl`
  (`question_id`, `choices[0].turns`), the file named after the judge model (`gen_judgment.py`,
  default `--judge-model gpt-4`). The `reference` field that 39 question rows carry is not read by
  FastChat's judging, so by default we ignore it too (`load(..., row_references=True)` opts in).
- judge prompts: `data/judge_prompts.jsonl`, `single-v1` / `single-math-v1` for turn 1 and
  `single-v1-multi-turn` / `single-math-v1-multi-turn` for turn 2 (which shows the model's own turn-1
  answer), filled as `common.run_judge_single` does; judged at temperature 0 with max_tokens 2048.
- rating: `common.one_score_pattern` (`[[n]]`), else `one_score_pattern_backup` (`[n]`).
- answers: `gen_model_answer.py --max-new-token 1024`, temperature by category (`common.temperature_config`).
- scores (`show_result.py`; `language_tasks.MTBenchTask.aggregate`): unrated judgments dropped, then the
  mean per turn and the mean over all.

Our deviations: FastChat asks the judge once and records -1 when the reply has no rating; we ask again,
at most `attempts` times in all (`attempts=1` is FastChat's behaviour), and leave a turn that still has
none unrated. FastChat also keeps any number it parses; we treat ratings outside 1-10 as unrated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixtral.eval.backends import Backend
from pixtral.eval.data import Dataset, Item, hash_files, read_jsonl
from pixtral.eval.errors import DataError

TASK = "mt_bench"
PROTOCOL = "fastchat-single-v1"

# gen_judgment.py: `--judge-model` defaults to "gpt-4", and references are read from
# reference_answer/<judge model>.jsonl, i.e. reference_answer/gpt-4.jsonl.
DEFAULT_JUDGE_MODEL = "gpt-4"
QUESTION_FILE = "question.jsonl"
REFERENCE_FILE = Path("reference_answer") / f"{DEFAULT_JUDGE_MODEL}.jsonl"

# common.py: categories judged against a reference answer.
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")

# common.run_judge_single: chat_completion_openai(model, conv, temperature=0, max_tokens=2048).
JUDGE_TEMPERATURE = 0.0
JUDGE_MAX_TOKENS = 2048

# gen_model_answer.py / gen_api_answer.py: --max-new-token / --max-tokens default 1024.
MAX_TOKENS = 1024
# common.temperature_config; categories not listed get 0.7 (gen_model_answer.py).
CATEGORY_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7

# data/judge_prompts.jsonl, verbatim (system_prompt, prompt_template).
SINGLE_V1_SYSTEM = "You are a helpful assistant."
SINGLE_V1_TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI"
    " assistant to the user question displayed below. Your evaluation should consider factors such as the"
    " helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your"
    " evaluation by providing a short explanation. Be as objective as possible. After providing your"
    " explanation, you must rate the response on a scale of 1 to 10 by strictly following this format:"
    " \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's"
    " Answer]\n{answer}\n[The End of Assistant's Answer]"
)
SINGLE_MATH_V1_SYSTEM = "You are a helpful assistant."
SINGLE_MATH_V1_TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI"
    " assistant to the user question displayed below. Your evaluation should consider correctness and"
    " helpfulness. You will be given a reference answer and the assistant's answer. Begin your evaluation by"
    " comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as"
    " objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10"
    " by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n"
    "{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n[The Start"
    " of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
SINGLE_V1_MULTI_TURN_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to"
    " the user question displayed below. Your evaluation should consider factors such as the helpfulness,"
    " relevance, accuracy, depth, creativity, and level of detail of the response. You evaluation should focus"
    " on the assistant's answer to the second user question. Begin your evaluation by providing a short"
    " explanation. Be as objective as possible. After providing your explanation, you must rate the response"
    " on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating:"
    " [[5]]\".\n\n"
)
SINGLE_V1_MULTI_TURN_TEMPLATE = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
    "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|The End of Assistant A's"
    " Conversation with User|>"
)
SINGLE_MATH_V1_MULTI_TURN_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to"
    " the user question. Your evaluation should consider correctness and helpfulness. You will be given a"
    " reference answer and the assistant's answer. You evaluation should focus on the assistant's answer to the"
    " second question. Begin your evaluation by comparing the assistant's answer with the reference answer."
    " Identify and correct any mistakes. Be as objective as possible. After providing your explanation, you"
    " must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for"
    " example: \"Rating: [[5]]\".\n\n"
)
SINGLE_MATH_V1_MULTI_TURN_TEMPLATE = (
    "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
    "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n"
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
    "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|The End of Assistant A's"
    " Conversation with User|>"
)

# (turn index, reference needed) -> (prompt name, system prompt, template), as gen_judgment.make_judge_single.
JUDGE_PROMPTS: dict[tuple[int, bool], tuple[str, str, str]] = {
    (0, False): ("single-v1", SINGLE_V1_SYSTEM, SINGLE_V1_TEMPLATE),
    (0, True): ("single-math-v1", SINGLE_MATH_V1_SYSTEM, SINGLE_MATH_V1_TEMPLATE),
    (1, False): ("single-v1-multi-turn", SINGLE_V1_MULTI_TURN_SYSTEM, SINGLE_V1_MULTI_TURN_TEMPLATE),
    (1, True): ("single-math-v1-multi-turn", SINGLE_MATH_V1_MULTI_TURN_SYSTEM, SINGLE_MATH_V1_MULTI_TURN_TEMPLATE),
}

# common.py: one_score_pattern and one_score_pattern_backup.
ONE_SCORE_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def needs_reference(category: str) -> bool:
    return category in NEED_REF_CATS


def answer_temperature(category: str) -> float:
    """The sampling temperature FastChat uses for the model's answers in this category."""
    return CATEGORY_TEMPERATURE.get(category, DEFAULT_TEMPERATURE)


# ------------------------------------------------------------------------------------------ data


def _question_id(path: Path, number: int, row: dict[str, Any]) -> str:
    qid = row.get("question_id")
    if qid is None:
        raise DataError(f"{path} line {number} field 'question_id': value is missing")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or str(qid) == "":
        raise DataError(f"{path} line {number} field 'question_id': expected an integer or a string, got {qid!r}")
    return str(qid)


def _string_list(path: Path, number: int, field_name: str, value: Any, *, allow_empty_strings: bool) -> list[str]:
    where = f"{path} line {number} field '{field_name}'"
    if value is None:
        raise DataError(f"{where}: value is missing")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of strings")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise DataError(f"{where}[{i}]: expected a string, got {type(text).__name__}")
        if not allow_empty_strings and not text.strip():
            raise DataError(f"{where}[{i}]: empty turn")
    return list(value)


def _read_references(path: Path) -> dict[str, tuple[int, list[str]]]:
    """question_id -> (line number, choices[0].turns) of a FastChat reference answer file."""
    refs: dict[str, tuple[int, list[str]]] = {}
    for number, row in read_jsonl(path):
        qid = _question_id(path, number, row)
        if qid in refs:
            raise DataError(f"{path} line {number} field 'question_id': duplicate id {qid} "
                            f"(first on line {refs[qid][0]})")
        choices = row.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise DataError(f"{path} line {number} field 'choices': expected a non-empty list of objects")
        turns = _string_list(path, number, "choices[0].turns", choices[0].get("turns"), allow_empty_strings=True)
        refs[qid] = (number, turns)
    return refs


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """(question file, reference file path) for FastChat's `data/mt_bench` folder or its question.jsonl."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory (pass FastChat's data/mt_bench folder with --data)")
    questions = root / QUESTION_FILE if root.is_dir() else root
    if not questions.is_file():
        raise DataError(f"{root}: no {QUESTION_FILE} in this folder (expected FastChat's data/mt_bench)")
    return questions, questions.parent / REFERENCE_FILE


def load(path: str | Path, limit: int | None = None, *, row_references: bool = False) -> Dataset:
    """FastChat's MT-Bench questions as items, one per question (all its turns).

    `path` is FastChat's `data/mt_bench` folder or its `question.jsonl`; references for the categories in
    NEED_REF_CATS come from `reference_answer/gpt-4.jsonl` next to it. With `row_references`, a question
    row's own `reference` field takes precedence (FastChat's judging never reads that field).
    """
    question_file, reference_file = _resolve(path)
    rows: list[tuple[int, str, str, list[str], list[str] | None]] = []
    seen: dict[str, int] = {}
    for number, row in read_jsonl(question_file):
        qid = _question_id(question_file, number, row)
        if qid in seen:
            raise DataError(f"{question_file} line {number} field 'question_id': duplicate id {qid} "
                            f"(first on line {seen[qid]})")
        seen[qid] = number
        category = row.get("category")
        if not isinstance(category, str) or not category:
            raise DataError(f"{question_file} line {number} field 'category': expected a non-empty string, "
                            f"got {category!r}")
        turns = _string_list(question_file, number, "turns", row.get("turns"), allow_empty_strings=False)
        if len(turns) > 2:
            raise DataError(f"{question_file} line {number} field 'turns': MT-Bench questions have one or two "
                            f"turns, got {len(turns)}")
        own = None
        if row_references and row.get("reference") is not None:
            own = _string_list(question_file, number, "reference", row["reference"], allow_empty_strings=True)
        rows.append((number, qid, category, turns, own))

    kept = rows if limit is None else rows[: max(0, limit)]
    refs: dict[str, tuple[int, list[str]]] | None = None
    items: list[Item] = []
    for number, qid, category, turns, own in kept:
        references = None
        if needs_reference(category):
            if own is not None:
                references, where = own, f"{question_file} line {number} field 'reference'"
            else:
                if refs is None:
                    if not reference_file.is_file():
                        raise DataError(f"{reference_file}: no such file, needed for the reference answer of "
                                        f"question_id {qid} ({category}, {question_file} line {number})")
                    refs = _read_references(reference_file)
                if qid not in refs:
                    raise DataError(f"{reference_file}: no reference answer for question_id {qid} ({category}, "
                                    f"{question_file} line {number})")
                ref_line, references = refs[qid]
                where = f"{reference_file} line {ref_line} field 'choices[0].turns'"
            if len(references) < len(turns):
                raise DataError(f"{where}: question_id {qid} has {len(turns)} turns but {len(references)} "
                                f"reference answer(s)")
            references = references[: len(turns)]
        items.append(Item(id=qid, messages=[], reference={"turns": turns, "references": references},
                          meta={"category": category}))

    files = [question_file] + ([reference_file] if reference_file.is_file() else [])
    return Dataset(TASK, files, hash_files(files, question_file.parent), total=len(items), records=len(items),
                   stream=lambda: iter(items))


# ----------------------------------------------------------------------------------------- judge


def parse_rating(reply: str) -> float | None:
    """FastChat's rating: the first `[[n]]`, else the first `[n]`; None when neither.

    FastChat records -1 for a reply without a rating (show_result.py then drops it); we return None and
    keep the turn unrated. FastChat keeps any number it parses; values outside 1-10 are None here.
    """
    match = ONE_SCORE_PATTERN.search(reply or "") or ONE_SCORE_PATTERN_BACKUP.search(reply or "")
    if not match:
        return None
    value = float(match.group(1))
    return value if 1.0 <= value <= 10.0 else None


def judge_messages(item: Item, answers: list[str], turn: int) -> list[dict[str, Any]]:
    """The judge's system prompt and user message for turn index 0 or 1, as common.run_judge_single."""
    turns: list[str] = item.reference["turns"]
    references: list[str] | None = item.reference.get("references")
    category = item.meta.get("category", "")
    if turn not in (0, 1) or turn >= len(turns):
        raise ValueError(f"item {item.id}: no turn index {turn} (it has {len(turns)} turn(s))")
    if len(answers) <= turn:
        raise ValueError(f"item {item.id}: judging turn index {turn} needs {turn + 1} answer(s), got {len(answers)}")
    ref_based = needs_reference(category)
    if ref_based and (references is None or len(references) <= turn):
        raise ValueError(f"item {item.id}: category {category} needs a reference answer for turn index {turn}")
    _, system, template = JUDGE_PROMPTS[(turn, ref_based)]
    fields: dict[str, str] = {}
    if ref_based:
        fields["ref_answer_1"] = references[0]
        if turn == 1:
            fields["ref_answer_2"] = references[1]
    if turn == 0:
        user = template.format(question=turns[0], answer=answers[0], **fields)
    else:
        user = template.format(question_1=turns[0], question_2=turns[1], answer_1=answers[0], answer_2=answers[1],
                               **fields)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def prompt_name(item: Item, turn: int) -> str:
    """The FastChat judge prompt used for this item's turn index (e.g. "single-math-v1-multi-turn")."""
    return JUDGE_PROMPTS[(turn, needs_reference(item.meta.get("category", "")))][0]


@dataclass
class TurnJudgements:
    ratings: list[float | None] = field(default_factory=list)  # one per turn, None when unrated
    rationales: list[str] = field(default_factory=list)  # the judge's last reply per turn
    attempts: list[int] = field(default_factory=list)

    @property
    def rated(self) -> bool:
        return bool(self.ratings) and all(r is not None for r in self.ratings)

    def row(self) -> dict[str, Any]:
        return {"ratings": list(self.ratings), "rationales": list(self.rationales), "attempts": list(self.attempts)}


class MTBenchJudge:
    """Rates each turn of an MT-Bench answer with FastChat's single-answer prompts (`gpt-4` by default)."""

    def __init__(self, backend: Backend, *, attempts: int = 3):
        self.backend = backend
        self.attempts = max(1, attempts)

    @property
    def identity(self) -> dict[str, Any]:
        return {**self.backend.identity, "protocol": PROTOCOL}

    def describe(self) -> dict[str, Any]:
        return {**self.backend.describe(), "protocol": PROTOCOL, "rating_attempts": self.attempts,
                "temperature": JUDGE_TEMPERATURE, "max_tokens": JUDGE_MAX_TOKENS}

    def rate(self, item: Item, answers: list[str]) -> TurnJudgements:
        """One judgement per turn of the item. Raises `backends.RequestFailed` when the judge endpoint
        itself fails. A reply without a usable rating is asked again, at most `attempts` times in all
        (FastChat asks once and records -1)."""
        count = len(item.reference["turns"])
        if len(answers) < count:
            raise ValueError(f"item {item.id}: {count} turn(s) but {len(answers)} answer(s)")
        result = TurnJudgements()
        for turn in range(count):
            messages = judge_messages(item, answers, turn)
            reply, rating, attempt = "", None, 0
            for attempt in range(1, self.attempts + 1):
                reply = self.backend.complete(messages, max_tokens=JUDGE_MAX_TOKENS, temperature=JUDGE_TEMPERATURE)
                rating = parse_rating(reply)
                if rating is not None:
                    break
            result.ratings.append(rating)
            result.rationales.append(reply)
            result.attempts.append(attempt)
        return result
