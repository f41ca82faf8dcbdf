"""Per-task scoring and aggregation: which metrics each task reports, under which names.

`TASK.json` metric names: `baseline`, `flexible_level_1..3` for MMMU, MathVista, ChartQA and synth
(plus `per_category` where the data has categories); `anls` for DocVQA; `vqa_match` for VQAv2;
`micro_average`, `per_category`, `per_turn`, `unrated_turns` for MM-MT-Bench. The `mistral_evals`
section carries the released harness's own names and values. The language tasks (MT-Bench, MMLU,
MATH, HumanEval) are in `language_tasks`.

Accuracy metrics are fractions in [0, 1] over all items; a failed item scores 0. MM-MT-Bench
averages are on the judge's 1-10 scale over the rated turns only.

A task turns an item into an answer (`query`: one request here; several turns or samples for the
language tasks), scores it (`score`) and aggregates the rows (`aggregate`); the runner does the rest.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import defaultdict
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from pixtral.eval import metrics, prompts
from pixtral.eval import mistral_evals as released

TASK_NAMES = ("mm_mt_bench", "mmmu", "mathvista", "chartqa", "docvqa", "vqav2", "synth",
              "mt_bench", "mmlu", "math", "humaneval")


@dataclass(frozen=True)
class ItemScore:
    scores: dict[str, float]
    mistral_evals: dict[str, float]
    extracted: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # more fields for the row (HumanEval's executions)


@dataclass(frozen=True)
class Decoding:
    """How answers are sampled: greedy with one sample unless a task samples several."""

    max_tokens: int
    temperature: float = prompts.TEMPERATURE
    samples: int = 1
    seed: int | None = None  # only when sampling
    by_category: bool = False  # MT-Bench: FastChat's temperature per category instead of `temperature`

    def key(self) -> dict[str, Any]:
        """What a resumed run must share beyond max_tokens and temperature (nothing for greedy tasks,
        so results written before samples existed still resume)."""
        sampled = self.seed is not None or self.samples > 1
        key: dict[str, Any] = {"samples": self.samples, "seed": self.seed} if sampled else {}
        if self.by_category:
            key["temperature_by_category"] = True
        return key

    def sample_seed(self, item_id: str, index: int) -> int | None:
        """A per-sample seed from the run's seed, the item and the sample's index: reproducible, and
        different for every sample (None when greedy)."""
        if self.seed is None:
            return None
        digest = hashlib.sha256(f"{self.seed}\0{item_id}\0{index}".encode()).digest()
        return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "levels", "synth", "anls", "vqa" or "judge"
    tolerance: float = 0.0  # numeric relative tolerance of the paper-protocol match

    @property
    def needs_judge(self) -> bool:
        return self.kind == "judge"

    def for_run(self, config: Any) -> Task:
        """The task set up for one run's options (the language tasks bind samples and the sandbox)."""
        return self

    def decoding(self, config: Any) -> Decoding:
        return Decoding(config.max_tokens or prompts.MAX_TOKENS[self.name])

    def settings(self) -> dict[str, Any]:
        """Task-specific settings for TASK.json."""
        return {}

    def request_log(self, item: Any, decoding: Decoding, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """What TASK.items.jsonl records of the request."""
        return {"messages": messages, "max_tokens": decoding.max_tokens, "temperature": decoding.temperature}

    def query(self, item: Any, backend: Any, decoding: Decoding, partial: Any = None) -> str:
        """The model's answer to one item: one request with the item's messages."""
        return backend.complete(item.messages, max_tokens=decoding.max_tokens, temperature=decoding.temperature)

    @property
    def score_keys(self) -> tuple[str, ...]:
        return {"anls": ("anls",), "vqa": ("vqa_match",), "judge": ()}.get(self.kind, metrics.LEVELS)

    def score(self, answer: str, reference: Any, previous: dict[str, Any] | None = None) -> ItemScore:
        """Scores of one answer (judge tasks are rated by the judge instead)."""
        if self.kind == "judge":
            return ItemScore({}, {}, {})
        if self.kind == "synth":
            scores, extracted = metrics.score_short_answer(answer, str(reference))
            return ItemScore(scores, {}, extracted)
        golds = [str(g) for g in reference]
        if self.kind == "levels":
            scores, extracted = metrics.score_levels(answer, golds, self.tolerance)
            return ItemScore(scores, {
                released.EXPLICIT: released.explicit_prompt_relaxed_correctness(answer, golds),
                released.ANYWHERE: released.anywhere_in_answer_relaxed_correctness(answer, golds),
            }, {**extracted, "mistral_evals": released.extract_final_answer(answer) or None})
        if self.kind == "anls":
            return ItemScore({"anls": metrics.anls(answer, golds)}, {"anls": released.anls(answer, golds)},
                             {"answer": answer.strip()})
        return ItemScore({"vqa_match": metrics.vqa_accuracy(answer, golds)},
                         {"vqa_match": released.vqa_match(answer, golds)}, {"answer": metrics.vqa_normalize(answer)})

    def progress_values(self, row: dict[str, Any]) -> dict[str, float]:
        """What one finished row adds to the running totals shown on the progress bar."""
        if self.kind == "judge":
            rating = (row.get("judge") or {}).get("rating")
            return {"rating": float(rating), "rated": 1.0} if rating is not None else {}
        keys = self.score_keys
        return {k: row_score(row, k) for k in ((keys[0], keys[-1]) if len(keys) > 1 else keys)}

    def format_running(self, totals: dict[str, float], count: int) -> str:
        if self.kind == "judge":
            rated = int(totals.get("rated", 0))
            return f"{totals['rating'] / rated:.2f}/10 ({rated} rated)" if rated else ""
        if not count:
            return ""
        return "  ".join(f"{_short(k)} {100 * v / count:.1f}%" for k, v in totals.items())

    def aggregate(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(`metrics`, `mistral_evals`) over the final rows of all items, in dataset order."""
        if self.kind == "judge":
            return self._aggregate_judge(rows)
        result: dict[str, Any] = {key: mean_or_none([row_score(r, key) for r in rows]) for key in self.score_keys}
        categories: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if (row.get("meta") or {}).get("category") is not None:
                categories[str(row["meta"]["category"])].append(row)
        if categories:
            result["per_category"] = {
                cat: {"count": len(group), **{k: mean_or_none([row_score(r, k) for r in group]) for k in self.score_keys}}
                for cat, group in sorted(categories.items())
            }
        keys = {"levels": (released.EXPLICIT, released.ANYWHERE), "synth": (), "anls": ("anls",), "vqa": ("vqa_match",)}
        section = {k: mean_or_none([(r.get("mistral_evals") or {}).get(k, 0.0) for r in rows]) for k in keys[self.kind]}
        return result, section

    def _aggregate_judge(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        rated = [(str(r["meta"]["category"]), int(r["meta"]["turn"]), float(r["judge"]["rating"]))
                 for r in rows if (r.get("judge") or {}).get("rating") is not None]
        per_category: dict[str, list[float]] = defaultdict(list)
        per_turn: dict[str, list[float]] = defaultdict(list)
        for category, turn, rating in rated:
            per_category[category].append(rating)
            per_turn[str(turn + 1)].append(rating)
        result = {
            "micro_average": mean_or_none([r for _, _, r in rated]),
            "per_category": {k: mean(v) for k, v in sorted(per_category.items())},
            "per_turn": {k: mean(v) for k, v in sorted(per_turn.items(), key=lambda kv: int(kv[0]))},
            "unrated_turns": len(rows) - len(rated),
        }
        return result, released.mm_mt_bench_aggregate(rated)


def row_score(row: dict[str, Any], key: str) -> float:
    """A row's score for `key`; a row that is not "ok" (failed, unrated) scores 0."""
    return float((row.get("scores") or {}).get(key, 0.0)) if row.get("status") == "ok" else 0.0


def mean_or_none(values: list[float]) -> float | None:
    return mean(values) if values else None


def _short(key: str) -> str:
    return {"baseline": "baseline", "flexible_level_3": "L3"}.get(key, key)


TASKS: dict[str, Task] = {
    "mm_mt_bench": Task("mm_mt_bench", "judge"),
    "mmmu": Task("mmmu", "levels"),
    "mathvista": Task("mathvista", "levels"),
    "chartqa": Task("chartqa", "levels", tolerance=metrics.CHARTQA_TOLERANCE),
    "docvqa": Task("docvqa", "anls"),
    "vqav2": Task("vqav2", "vqa"),
    "synth": Task("synth", "synth"),
}


# The language tasks subclass Task and add themselves to TASKS when their module loads (by name: that
# module imports this one, and either may be imported first).
importlib.import_module("pixtral.eval.language_tasks")
