"""The paper-protocol metrics: answer matching per parsing level, ANLS with τ = 0.5, VQA accuracy.

Decisions the protocol leaves open (docs/evaluation.md, 'Decisions our code fixes'), fixed here:

* Matching is the same at every level; only the extraction differs (`parsing.py`). A letter gold
  (multiple choice) matches `B`, `(B)`, `B.` or `B. 12 cm`; numbers compare as numbers (`6.0` = `6`,
  `$1,200` = `1200`, `25%` = `0.25`); other text compares case-insensitively after stripping
  surrounding quotes and trailing `.,;:!`.
* ChartQA uses the 5% relative tolerance (as in the paper); MathVista and MMMU compare numbers
  exactly. The released harness's 5%-everywhere scoring is in `mistral_evals.py`.
* Levels are cumulative: level k accepts everything level k-1 accepts; level 3 adds the
  anywhere-in-response search.
* ANLS: the released harness's normalisation (lower case, single spaces, no trailing punctuation)
  with the standard threshold τ = 0.5: a prediction whose normalised edit distance to every gold is
  0.5 or more scores 0.
* VQA accuracy: the standard VQA answer normalisation (punctuation, number words to digits,
  articles, contractions) and the official averaging over the ten leave-one-out subsets of the golds,
  min(1, matches / 3) each. An item with a single gold scores exact match.
* `synth` answers are short and exact; its levels: baseline = whole response equals the answer
  after lower-casing and whitespace normalisation; level 1 also drops an `Answer:`/`Final Answer:`
  prefix, surrounding quotes and trailing `.,;:!`; level 2 also drops markdown (`*`, backticks) and
  compares numbers as numbers; level 3: the answer appears in the response as a whole word or phrase.
"""

from __future__ import annotations

import math
import re

from pixtral.eval.parsing import (
    extract_answer,
    gold_appears,
    normalize_text,
    parse_number,
    strip_end_punctuation,
)

LEVELS = ("baseline", "flexible_level_1", "flexible_level_2", "flexible_level_3")
CHARTQA_TOLERANCE = 0.05


def clean_answer(text: str) -> str:
    s = " ".join(text.split())
    while len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return s.rstrip(".,;:!").strip()


def _choice_letter(text: str) -> str | None:
    match = re.fullmatch(r"\(?([A-Za-z])\)?(?:[.):](?:\s.*)?)?", text, re.DOTALL)
    return match.group(1).upper() if match else None


def numbers_match(pred: tuple[float, bool], gold: tuple[float, bool], tolerance: float) -> bool:
    """Relative tolerance against the gold; a percentage also counts as its fraction (25% = 0.25)."""
    preds = {pred[0], pred[0] / 100} if pred[1] else {pred[0]}
    golds = {gold[0], gold[0] / 100} if gold[1] else {gold[0]}
    for p in preds:
        for g in golds:
            if tolerance > 0:
                if abs(p - g) <= tolerance * abs(g):
                    return True
            elif math.isclose(p, g, rel_tol=1e-9, abs_tol=1e-12):
                return True
    return False


def answer_matches(pred: str | None, gold: str, tolerance: float = 0.0) -> bool:
    """Whether an extracted answer equals the gold (see the module docstring for the rules)."""
    if pred is None:
        return False
    p, g = clean_answer(pred), clean_answer(gold)
    if not p:
        return False
    if re.fullmatch(r"[A-Za-z]", g) and _choice_letter(p):
        return _choice_letter(p) == g.upper()
    pn, gn = parse_number(p), parse_number(g)
    if pn is not None and gn is not None:
        return numbers_match(pn, gn, tolerance)
    return normalize_text(p) == normalize_text(g)


def score_levels(response: str, golds: list[str], tolerance: float = 0.0) -> tuple[dict[str, float], dict[str, str | None]]:
    """Per-level scores (0/1, cumulative) and the answer each level extracted."""
    extracted = {LEVELS[level]: extract_answer(response, level) for level in range(3)}
    scores: dict[str, float] = {}
    correct = False
    for level in range(3):
        answer = extracted[LEVELS[level]]
        correct = correct or any(answer_matches(answer, g, tolerance) for g in golds)
        scores[LEVELS[level]] = float(correct)
    scores[LEVELS[3]] = float(correct or any(gold_appears(response, g) for g in golds))
    return scores, extracted


# ------------------------------------------------------------------------------------- synth

_PREFIX = re.compile(r"^(?:final\s+)?answer\s*:\s*", re.IGNORECASE)


def score_short_answer(response: str, gold: str) -> tuple[dict[str, float], dict[str, str | None]]:
    """`synth` levels (module docstring): short exact answers, no `Final Answer:` prompt."""
    base = normalize_text(response)
    level_1 = clean_answer(_PREFIX.sub("", base))
    level_2 = clean_answer(_PREFIX.sub("", normalize_text(re.sub(r"[*`]", "", response))).strip("_ "))
    g = normalize_text(gold)
    g1 = clean_answer(g)
    scores: dict[str, float] = {}
    correct = base == g
    scores[LEVELS[0]] = float(correct)
    correct = correct or level_1 == g1
    scores[LEVELS[1]] = float(correct)
    pn, gn = parse_number(level_2), parse_number(g1)
    correct = correct or level_2 == g1 or (pn is not None and gn is not None and numbers_match(pn, gn, 0.0))
    scores[LEVELS[2]] = float(correct)
    appears = bool(g1) and re.search(rf"(?<!\w){re.escape(g1)}(?!\w)", base) is not None
    scores[LEVELS[3]] = float(correct or appears)
    return scores, {LEVELS[0]: base, LEVELS[1]: level_1, LEVELS[2]: level_2}


# -------------------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_normalize(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation or whitespace (a trailing `%` stays)."""
    return strip_end_punctuation(" ".join(text.lower().split()))


def normalized_edit_distance(pred: str, gold: str) -> float:
    longest = max(len(pred), len(gold))
    return levenshtein(pred, gold) / longest if longest else 0.0


def anls(pred: str, golds: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction: max over golds of 1 - NL, or 0
    when NL >= threshold (Biten et al., 2019)."""
    p = anls_normalize(pred)
    best = 0.0
    for gold in golds:
        nl = normalized_edit_distance(p, anls_normalize(gold))
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


# ------------------------------------------------------------------------------ VQA accuracy

_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "hed": "he'd", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "im": "i'm", "ive": "i've", "isnt": "isn't", "itll": "it'll", "lets": "let's", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "shant": "shan't",
    "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "weve": "we've", "whats": "what's", "wheres": "where's", "whos": "who's",
    "whove": "who've", "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've", "yall": "y'all",
}


def vqa_normalize(answer: str) -> str:
    """The standard VQA answer normalisation: punctuation, periods, number words, articles, contractions."""
    s = answer.replace("\n", " ").replace("\t", " ").strip()
    drop_all = re.search(r"\d,\d", s) is not None
    for p in _VQA_PUNCT:
        if drop_all or f"{p} " in s or f" {p}" in s:
            s = s.replace(p, "")
        else:
            s = s.replace(p, " ")
    s = re.sub(r"\.(?!\d)", "", s)  # periods, except decimal points
    words = [_NUMBER_WORDS.get(w, w) for w in s.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(pred: str, golds: list[str]) -> float:
    """Official VQA accuracy: mean over leave-one-out gold subsets of min(1, matches / 3)."""
    if not golds:
        return 0.0
    p = vqa_normalize(pred)
    normalized = [vqa_normalize(g) for g in golds]
    if len(normalized) == 1:
        return float(p == normalized[0])
    matches = sum(g == p for g in normalized)
    return sum(min(1.0, (matches - (g == p)) / 3) for g in normalized) / len(normalized)
