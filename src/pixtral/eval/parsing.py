"""Answer extraction at the paper's parsing levels (Pixtral 12B, §4.3 and App. C).

* Baseline: the response must end with `Final Answer: <ANSWER>` (exact spelling, last line).
* Flexible level 1: also accepts a response ending with `Answer: <ANSWER>` (any case; the answer
  may sit on the line after the colon).
* Flexible level 2: also strips added markdown (`**Answer:**`, `**Answer**:`, `*Answer: X*`,
  `Answer: **X**`, backticks) before extracting.
* Flexible level 3 is not an extraction but a search for the gold answer anywhere in the response
  (`gold_appears`): for a letter, `is <A>`, `are <A>` or the letter alone on a line; for a number,
  the number with or without thousands separators, as a plain substring (so "6000" contains "6",
  which the paper accepts as an upper bound); for text, a case-insensitive substring.
"""

from __future__ import annotations

import re
import string

_BASELINE = re.compile(r"Final Answer:[ \t]*([^\n]*\S)\s*\Z")
_LEVEL_1 = re.compile(r"answer:\s*([^\n]*\S)\s*\Z", re.IGNORECASE)
_MARKDOWN_LABEL = re.compile(r"(answer)[*_]*[ \t]*:[*_]*", re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def extract_answer(response: str, level: int) -> str | None:
    """The final answer at parsing level 0 (baseline), 1 or 2; None when the format is not met."""
    if level == 0:
        match = _BASELINE.search(response)
        return match.group(1).strip() if match else None
    if level == 1:
        match = _LEVEL_1.search(response)
        return match.group(1).strip() if match else None
    if level == 2:
        text = _MARKDOWN_LABEL.sub(lambda m: m.group(1) + ":", response)
        text = re.sub(r"[*`]+[ \t]*$", "", text.rstrip())  # closing emphasis after the answer
        match = _LEVEL_1.search(text)
        if not match:
            return None
        answer = match.group(1).replace("*", "").replace("`", "").strip().strip("_").strip()
        return answer or None
    raise ValueError(f"parsing level must be 0, 1 or 2, got {level}")


def parse_number(text: str) -> tuple[float, bool] | None:
    """(value, is_percent) for strings such as `1,200`, `$3.5`, `-2`, `25%`; None otherwise."""
    s = text.strip().replace(",", "").replace(" ", "")
    if s.startswith("$"):
        s = s[1:]
    percent = s.endswith("%")
    if percent:
        s = s[:-1]
    if not _NUMBER.fullmatch(s):
        return None
    return float(s), percent


def normalize_text(text: str) -> str:
    """Lower case, single spaces."""
    return " ".join(text.lower().split())


def gold_appears(response: str, gold: str) -> bool:
    """Flexible level 3: whether the gold answer occurs anywhere in the response."""
    gold = gold.strip()
    if not gold:
        return False
    if re.fullmatch(r"[A-Z]", gold):
        letter = re.escape(gold)
        patterns = (rf"\b(?i:is|are)[ \t]+\(?{letter}\)?(?![\w])", rf"(?m)^[ \t*]*\(?{letter}\)?[.):]?[ \t*]*$")
        return any(re.search(p, response) for p in patterns)
    number = parse_number(gold)
    if number is not None and not number[1]:
        value = number[0]
        forms = {gold}
        if value == int(value):
            forms |= {str(int(value)), f"{int(value):,}"}
        else:
            forms |= {repr(value), f"{value:,}"}
        return any(form in response for form in forms)
    return normalize_text(gold) in normalize_text(response)


def strip_end_punctuation(text: str) -> str:
    """Drop trailing punctuation and whitespace, keeping a trailing `%`."""
    end = len(text)
    while end and text[end - 1] != "%" and (text[end - 1] in string.punctuation or text[end - 1].isspace()):
        end -= 1
    return text[:end]
