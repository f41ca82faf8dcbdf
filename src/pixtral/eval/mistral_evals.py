"""The released harness's metrics (`mistralai/mistral-evals`, `eval/metrics.py`), reproduced exactly,
quirks included, so our numbers can be compared with numbers produced by that harness.

Differences from the paper protocol that are reproduced on purpose (docs/evaluation.md, 'The released harness's metrics'):
`explicit_prompt_relaxed_correctness` accepts any `answer:` (like flexible level 2) and applies the
5% numeric tolerance to every task; text answers keep trailing punctuation ("Yes." != "Yes");
a letter gold matches the first character of the answer; `anywhere_in_answer_relaxed_correctness`
lowercases its search patterns but not the response; ANLS has its threshold at 0 (no cutoff);
VQA match only strips surrounding quotes; the MM-MT-Bench macro average pools category and turn means.

The one deliberate change: VQAv2 golds are the `answer` strings of the `answers` dicts (the released
code compares the dicts themselves; a harness must extract `.answer`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from statistics import mean
from typing import Iterable

from pixtral.eval.metrics import levenshtein
from pixtral.eval.parsing import strip_end_punctuation

EXPLICIT = "explicit_prompt_relaxed_correctness"
ANYWHERE = "anywhere_in_answer_relaxed_correctness"


def _strip_quotes(s: str) -> str:
    if len(s) >= 1 and s[0] == s[-1] and s[0] in "\"'":
        return s[1:-1]
    return s


def _to_float(text: str) -> tuple[float | None, bool]:
    text = text.strip()
    try:
        return float(text.rstrip("%")), text.endswith("%")
    except ValueError:
        return None, False


def _prepare(text: str) -> str:
    if any(ch.isdigit() for ch in text):
        return strip_end_punctuation(text).replace(",", "").replace("$", "")
    return _strip_quotes(text)


def _within(pred: float, gold: float, tolerance: float) -> bool:
    return abs(pred - gold) / max(abs(gold), 1e-10) <= tolerance


def relaxed_correctness(prediction: str, golds: list[str], tolerance: float = 0.05) -> float:
    """ChartQA-style relaxed correctness as released: max over the golds."""
    pred = _prepare(prediction)
    p_value, p_percent = _to_float(pred)
    values = []
    for gold in golds:
        g = _prepare(gold)
        g_value, g_percent = _to_float(g)
        if p_value is not None and g_value is not None:
            ok = _within(p_value, g_value, tolerance)
            if not ok and (p_percent or g_percent):
                ok = (_within(p_value / 100 if p_percent else p_value, g_value, tolerance)
                      or _within(p_value, g_value / 100 if g_percent else g_value, tolerance))
        elif len(g) == 1 and g.isalpha() and pred:
            ok = pred[0].lower() == g.lower()
        else:
            ok = pred.lower() == g.lower()
        values.append(float(ok))
    return max(values) if values else 0.0


def extract_final_answer(response: str) -> str:
    """The text after the last `answer:` (any case), first non-empty line, markdown characters removed."""
    text = re.sub(r"([aA]nswer)\**:\**", r"\1:", response)
    index = text.lower().rfind("answer:")
    if index < 0:
        return ""
    lines = text[index + len("answer:"):].split("\n")
    answer = next((line.strip() for line in lines if line.strip()), "")
    return re.sub(r"[*_\[\]()]", "", answer)


def explicit_prompt_relaxed_correctness(response: str, golds: list[str]) -> float:
    answer = extract_final_answer(response)
    return relaxed_correctness(answer, golds) if answer else 0.0


def anywhere_in_answer_relaxed_correctness(response: str, golds: list[str]) -> float:
    answer = extract_final_answer(response)
    if answer:
        return relaxed_correctness(answer, golds)
    for gold in golds:
        try:
            number = float(gold)
            if int(number) == number:
                number = int(number)
        except (ValueError, OverflowError):
            candidates = [c for g in golds for c in (f"is {g}", f"was {g}", f" {g}.", f"are {g}", f"\n\n{g}")]
            if any(c.lower() in response for c in candidates):  # the released case bug: response not lowered
                return 1.0
            continue
        if format(number, ",") in response or str(number) in response or f"{number}%" in response:
            return 1.0
    return 0.0


def anls(prediction: str, golds: list[str]) -> float:
    """ANLS as released: threshold 0.0, so every prediction gets 1 - (min normalised edit distance)."""
    pred = strip_end_punctuation(" ".join(prediction.strip().lower().split()))
    best = float("inf")
    for gold in golds:
        g = strip_end_punctuation(" ".join(gold.strip().lower().split()))
        longest = max(len(g), len(pred))
        best = min(best, 0.0 if longest == 0 else levenshtein(g, pred) / longest)
    return 0.0 if 1 - best < 0.0 else 1 - best


def vqa_match(prediction: str, golds: list[str]) -> float:
    """min(1, #golds equal to the prediction / 3), comparing after removing surrounding quotes only."""
    pred = _strip_quotes(prediction)
    return min(1.0, sum(_strip_quotes(g) == pred for g in golds) / 3)


def mm_mt_bench_aggregate(ratings: Iterable[tuple[str, int, float]]) -> dict[str, float]:
    """(category, 0-based turn, rating) -> `micro_average_score`, `macro_average_score` (mean of all
    `_average` values, category and turn means pooled, as released), `<category>_average`, `<turn>_average`."""
    ratings = list(ratings)
    if not ratings:
        return {}
    groups: dict[str, list[float]] = defaultdict(list)
    for category, turn, rating in ratings:
        groups[f"{category}_average"].append(rating)
        groups[f"{turn}_average"].append(rating)
    averages = {key: mean(values) for key, values in groups.items()}
    return {
        "micro_average_score": mean(r for _, _, r in ratings),
        "macro_average_score": mean(averages.values()),
        **averages,
    }
