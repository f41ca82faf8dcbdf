"""The MM-MT-Bench judge, as the paper intends it (docs/evaluation.md, 'MM-MT-Bench').

The judge gets the verbatim system prompt and one user message holding the conversation up to the
graded turn: the real question text of every user turn, with the image where the conversation has
it (unless `include_image` is off), the reference answer of every turn (the graded one included) as
plain text, then the model's answer. This fixes the released harness's transcript, which shows the
judge the literal text `rolecontent`, Python reprs of the references and no image (issue #8).

The rating is the first `[[n]]` in the reply (decimals allowed; values outside 1-10 are rejected).
A reply without a usable rating is asked again at most `attempts` times in all; a turn that still
has none is reported as unrated, never retried in a loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pixtral.eval import prompts
from pixtral.eval.backends import Backend
from pixtral.eval.data import Item

RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")


def parse_rating(reply: str) -> float | None:
    """The first `[[n]]` rating in a judge reply, or None when absent or outside 1-10."""
    match = RATING.search(reply or "")
    if not match:
        return None
    value = float(match.group(1))
    return value if 1.0 <= value <= 10.0 else None


def build_judge_messages(turns: list[tuple[list[dict[str, Any]], str]], answer: str,
                         include_image: bool = True) -> list[dict[str, Any]]:
    """System prompt plus the transcript (the template in docs/evaluation.md, 'MM-MT-Bench'), with
    the image in its place in the conversation."""
    parts: list[dict[str, Any]] = []

    def add_text(text: str) -> None:
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += text
        else:
            parts.append({"type": "text", "text": text})

    add_text(prompts.JUDGE_OPEN)
    for user_content, reference in turns:
        add_text(prompts.JUDGE_USER)
        for part in user_content:
            if part["type"] == "text":
                add_text(part["text"])
            elif include_image:
                parts.append(part)
        add_text(prompts.JUDGE_REFERENCE.format(reference=reference))
    add_text(prompts.JUDGE_ANSWER.format(answer=answer))
    add_text(prompts.JUDGE_CLOSE)
    return [{"role": "system", "content": prompts.JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": parts}]


@dataclass
class Judgement:
    rating: float | None
    rationale: str  # the judge's last reply
    attempts: int

    @property
    def rated(self) -> bool:
        return self.rating is not None

    def row(self) -> dict[str, Any]:
        """What TASK.items.jsonl keeps under "judge"."""
        return {"rating": self.rating, "rationale": self.rationale, "attempts": self.attempts}


class Judge:
    """Rates one answer with an OpenAI-compatible judge (`gpt-4o-2024-05-13` by default)."""

    def __init__(self, backend: Backend, *, include_image: bool = True, attempts: int = 3):
        self.backend = backend
        self.include_image = include_image
        self.attempts = max(1, attempts)

    @property
    def identity(self) -> dict[str, Any]:
        return {**self.backend.identity, "image": self.include_image}

    def describe(self) -> dict[str, Any]:
        return {**self.backend.describe(), "image": self.include_image, "rating_attempts": self.attempts,
                "temperature": prompts.JUDGE_TEMPERATURE, "max_tokens": prompts.JUDGE_MAX_TOKENS}

    def rate(self, item: Item, answer: str) -> Judgement:
        """Raises `backends.RequestFailed` when the judge endpoint itself fails."""
        if item.judge_turns is None:
            raise ValueError(f"item {item.id} has no conversation for the judge")
        messages = build_judge_messages(item.judge_turns, answer, self.include_image)
        reply = ""
        for attempt in range(1, self.attempts + 1):
            reply = self.backend.complete(messages, max_tokens=prompts.JUDGE_MAX_TOKENS,
                                          temperature=prompts.JUDGE_TEMPERATURE)
            rating = parse_rating(reply)
            if rating is not None:
                return Judgement(rating, reply, attempt)
        return Judgement(None, reply, self.attempts)
