"""The paper's language table (Table 3): MT-Bench, MMLU, MATH and HumanEval, text only.

The paper names no harness for these ("common prompting and evaluation protocols"), so each task
follows the common one (docs/evaluation.md, 'Language tasks', says which and why):

  mt_bench   FastChat's MT-Bench: 80 two-turn questions, the model answers turn 2 after its own
             turn-1 answer; single-answer grading by an LLM judge (`mt_bench`); mean over rated turns.
  mmlu       Hendrycks' 5-shot prompt; the letter read from the generated answer, and, where the
             endpoint returns logprobs, the likeliest of A-D at the first answer token (`mmlu`).
  math       MATH test (5000, or the MATH-500 subset): zero-shot chain of thought ending in
             `\\boxed{}`; Hendrycks/Minerva normalisation (`math_answers`); maj@k over k samples.
  humaneval  164 problems, evalplus's instruction prompt, code run against the tests in a sandbox
             (`sandbox`); pass@k with the unbiased estimator (`humaneval`).

Answers with several requests (turns, samples) keep what finished when a later request fails, so a
resumed run asks only for the rest.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from statistics import mean
from typing import Any

from pixtral.errors import ConfigError
from pixtral.eval.backends import RequestFailed
from pixtral.eval.errors import BackendError, EndpointUnreachableError
from pixtral.eval import tasks as _registry
from pixtral.eval import mt_bench
from pixtral.eval.tasks import Decoding, ItemScore, Task, mean_or_none, row_score

# Table 3 of the paper (text-only benchmarks), as printed.
PAPER_TABLE3: dict[str, dict[str, float]] = {
    "Pixtral 12B": {"mt_bench": 7.68, "mmlu": 69.2, "math": 48.1, "humaneval": 72.0},
    "LLaVA-OneVision 7B": {"mt_bench": 6.94, "mmlu": 67.9, "math": 38.6, "humaneval": 65.9},
    "Molmo-D 7B": {"mt_bench": 4.53, "mmlu": 61.2, "math": 10.2, "humaneval": 3.7},
    "Qwen-2-VL 7B": {"mt_bench": 6.41, "mmlu": 68.5, "math": 27.9, "humaneval": 62.2},
    "Llama-3.2 11B": {"mt_bench": 7.51, "mmlu": 68.5, "math": 48.3, "humaneval": 62.8},
}
PAPER_COLUMNS = {"mt_bench": "MT-Bench", "mmlu": "MMLU (5-shot)", "math": "Math (Maj@1)", "humaneval": "HumanEval (Pass@1)"}

MAX_TOKENS = {"mt_bench": mt_bench.MAX_TOKENS, "mmlu": 32, "math": 2048, "humaneval": 1024}
# With several samples: Minerva's maj@k temperature for MATH, Codex's pass@k (k >= 10) one for HumanEval.
SAMPLE_TEMPERATURE = {"math": 0.6, "humaneval": 0.8}
MMLU_TOP_LOGPROBS = 20  # the most OpenAI's API returns


def _unfinished(exc: Exception, answers: list[Any]) -> Exception:
    """The request's failure, carrying the answers finished before it (saved for the resume)."""
    exc.partial = list(answers) or None
    return exc


def _counts(row: dict[str, Any], key: str) -> bool:
    """Whether a row counts in the mean of `key`: scored with it, or failed (a failed item is wrong). An
    MMLU answer the endpoint sent without logprobs has no logprob score and is left out of that mean."""
    return key in (row.get("scores") or {}) or row.get("status") == "failed"


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    return mean_or_none([row_score(r, key) for r in rows if _counts(r, key)])


def _grouped(rows: list[dict[str, Any]], group_of, keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[str(group_of(row))].append(row)
    return {name: {"count": len(group), **{k: _mean_of(group, k) for k in keys}}
            for name, group in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))}


def _sort_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


@dataclass(frozen=True)
class LanguageTask(Task):
    """Shared by the four: text prompts, greedy unless sampling, accuracy-style progress."""

    headline: str = ""  # the metric set beside the paper's Table 3

    @property
    def needs_judge(self) -> bool:
        return False

    def decoding(self, config: Any) -> Decoding:
        max_tokens = config.max_tokens or MAX_TOKENS[self.name]
        samples = config.samples
        if samples > 1 and self.name not in SAMPLE_TEMPERATURE:
            raise ConfigError(f"--samples is for math and humaneval, not {self.name}")
        temperature = config.temperature
        if temperature is None:
            temperature = SAMPLE_TEMPERATURE[self.name] if samples > 1 else 0.0
        return Decoding(max_tokens, temperature, samples, config.seed if temperature else None)

    @property
    def score_keys(self) -> tuple[str, ...]:
        return (self.headline,)

    def progress_values(self, row: dict[str, Any]) -> dict[str, float]:
        return {self.headline: row_score(row, self.headline)}

    def format_running(self, totals: dict[str, float], count: int) -> str:
        return f"{self.headline} {100 * totals.get(self.headline, 0.0) / count:.1f}%" if count else ""

    def sample(self, item: Any, backend: Any, decoding: Decoding, partial: list[str] | None) -> list[str]:
        """`decoding.samples` answers to the item's messages, each with its own seed."""
        answers = list(partial or [])[: decoding.samples]
        for index in range(len(answers), decoding.samples):
            try:
                answers.append(backend.complete(item.messages, max_tokens=decoding.max_tokens,
                                                temperature=decoding.temperature,
                                                seed=decoding.sample_seed(item.id, index)))
            except (RequestFailed, EndpointUnreachableError) as exc:
                raise _unfinished(exc, answers)
        return answers


# ------------------------------------------------------------------------------------ MT-Bench


@dataclass(frozen=True)
class MTBenchTask(LanguageTask):
    @property
    def needs_judge(self) -> bool:
        return True

    def decoding(self, config: Any) -> Decoding:
        """FastChat's temperature per category (seeded where it samples), unless --temperature sets one
        for all (0: greedy everywhere)."""
        if config.samples > 1:
            raise ConfigError("--samples is for math and humaneval, not mt_bench")
        max_tokens = config.max_tokens or MAX_TOKENS[self.name]
        if config.temperature is None:
            return Decoding(max_tokens, 0.0, 1, config.seed, by_category=True)
        return Decoding(max_tokens, config.temperature, 1, config.seed if config.temperature else None)

    @property
    def score_keys(self) -> tuple[str, ...]:
        return ()

    def request_log(self, item: Any, decoding: Decoding, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {"turns": item.reference["turns"], "max_tokens": decoding.max_tokens,
                "temperature": self._temperature(item, decoding)}

    def _temperature(self, item: Any, decoding: Decoding) -> float:
        from pixtral.eval import mt_bench

        return mt_bench.answer_temperature(item.meta["category"]) if decoding.by_category else decoding.temperature

    def query(self, item: Any, backend: Any, decoding: Decoding, partial: Any = None) -> list[str]:
        """Every turn in order; each sees the model's own earlier answers (FastChat's gen_model_answer)."""
        temperature = self._temperature(item, decoding)
        answers: list[str] = list(partial or [])
        messages: list[dict[str, Any]] = []
        for index, question in enumerate(item.reference["turns"]):
            messages.append({"role": "user", "content": question})
            if index == len(answers):
                seed = decoding.sample_seed(item.id, index) if temperature else None
                try:
                    answers.append(backend.complete(messages, max_tokens=decoding.max_tokens,
                                                    temperature=temperature, seed=seed))
                except (RequestFailed, EndpointUnreachableError) as exc:
                    raise _unfinished(exc, answers)
            # Mistral's chat format refuses an empty assistant message: an empty answer goes back as a space.
            messages.append({"role": "assistant", "content": answers[index] or " "})
        return answers

    def score(self, answer: Any, reference: Any, previous: dict[str, Any] | None = None) -> ItemScore:
        return ItemScore({}, {}, {})

    def progress_values(self, row: dict[str, Any]) -> dict[str, float]:
        ratings = [r for r in (row.get("judge") or {}).get("ratings") or [] if r is not None]
        return {"rating": float(sum(ratings)), "rated": float(len(ratings))}

    def format_running(self, totals: dict[str, float], count: int) -> str:
        rated = int(totals.get("rated", 0))
        return f"{totals['rating'] / rated:.2f}/10 ({rated} turns rated)" if rated else ""

    def aggregate(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """FastChat's show_result: the mean over every rated turn, per turn, and per category."""
        per_turn: dict[str, list[float]] = defaultdict(list)
        per_category: dict[str, list[float]] = defaultdict(list)
        judged = unjudged = 0
        for row in rows:
            count = len(row.get("answer") or []) or int(row["meta"].get("turns", 2))
            if "ratings" not in (row.get("judge") or {}):  # not answered, --no-judge, or the judge failed
                unjudged += count
                continue
            judged += count
            for index, rating in enumerate(row["judge"].get("ratings") or []):
                if rating is not None:
                    per_turn[str(index + 1)].append(float(rating))
                    per_category[str(row["meta"]["category"])].append(float(rating))
        rated = [r for values in per_turn.values() for r in values]
        return {
            "score": mean_or_none(rated),
            "per_turn": {k: mean(v) for k, v in sorted(per_turn.items(), key=lambda kv: int(kv[0]))},
            "per_category": {k: mean(v) for k, v in sorted(per_category.items())},
            "rated_turns": len(rated),
            "unrated_turns": judged - len(rated),
            "unjudged_turns": unjudged,
        }, {}


# ---------------------------------------------------------------------------------------- MMLU


@dataclass(frozen=True)
class MMLUTask(LanguageTask):
    def query(self, item: Any, backend: Any, decoding: Decoding, partial: Any = None) -> dict[str, Any]:
        text, top = backend.complete_logprobs(item.messages, max_tokens=decoding.max_tokens,
                                              temperature=decoding.temperature, top_logprobs=MMLU_TOP_LOGPROBS)
        return {"text": text, "top_logprobs": [[t, lp] for t, lp in top] if top is not None else None}

    def score(self, answer: Any, reference: Any, previous: dict[str, Any] | None = None) -> ItemScore:
        from pixtral.eval import mmlu

        letter = mmlu.extract_letter(answer["text"])
        scores = {"accuracy": float(letter == reference)}
        extracted: dict[str, Any] = {"letter": letter}
        if answer.get("top_logprobs") is not None:
            best, per_letter = mmlu.letter_from_top_logprobs([(t, lp) for t, lp in answer["top_logprobs"]])
            scores["logprob_accuracy"] = float(best == reference)
            extracted.update(logprob_letter=best, letter_logprobs=per_letter)
        return ItemScore(scores, {}, extracted, {"letter": letter})

    def aggregate(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Micro (over questions) and macro (over subjects) accuracy, for both ways of reading the letter."""
        from pixtral.eval import mmlu

        with_logprobs = any("logprob_accuracy" in (r.get("scores") or {}) for r in rows)
        keys = ("accuracy", "logprob_accuracy") if with_logprobs else ("accuracy",)
        subject = lambda row: row["meta"]["subject"]  # noqa: E731
        per_subject = _grouped(rows, subject, keys)
        result: dict[str, Any] = {}
        for key in keys:
            result[key] = _mean_of(rows, key)
            result[f"macro_{key}"] = mean_or_none([group[key] for group in per_subject.values() if group[key] is not None])
        if not with_logprobs:
            result["logprob_accuracy"] = None  # the endpoint gave no logprobs
        result["logprob_scored"] = sum(1 for r in rows if "logprob_accuracy" in (r.get("scores") or {}))
        result["no_letter"] = sum(1 for r in rows if r.get("status") == "ok" and r.get("letter") is None)
        result["per_category"] = _grouped(rows, lambda r: mmlu.SUBJECT_CATEGORIES.get(subject(r), "other"), keys)
        result["per_subject"] = per_subject
        return result, {}


# ---------------------------------------------------------------------------------------- MATH


@dataclass(frozen=True)
class MathTask(LanguageTask):
    def query(self, item: Any, backend: Any, decoding: Decoding, partial: Any = None) -> list[str]:
        return self.sample(item, backend, decoding, partial)

    def score(self, answer: Any, reference: Any, previous: dict[str, Any] | None = None) -> ItemScore:
        from pixtral.eval import math_answers

        predictions = [math_answers.extract_answer(a) for a in answer]
        voted, votes = math_answers.majority(predictions)
        correct = [math_answers.is_equiv(p, reference) for p in predictions]
        return ItemScore({"maj_at_k": float(voted is not None and math_answers.is_equiv(voted, reference)),
                          "sample_accuracy": sum(correct) / len(correct) if correct else 0.0},
                         {}, {"answers": predictions, "majority": voted, "votes": votes, "reference": reference})

    @property
    def score_keys(self) -> tuple[str, ...]:
        return ("maj_at_k", "sample_accuracy")

    def aggregate(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        keys = self.score_keys
        result: dict[str, Any] = {k: _mean_of(rows, k) for k in keys}
        result["per_level"] = _grouped(rows, lambda r: r["meta"].get("level", "?"), keys)
        result["per_subject"] = _grouped(rows, lambda r: r["meta"].get("subject", "?"), keys)
        return result, {}


# ----------------------------------------------------------------------------------- HumanEval


@dataclass(frozen=True)
class HumanEvalTask(LanguageTask):
    sandbox: Any = field(default=None, compare=False)
    slots: Any = field(default=None, compare=False)  # executions at once: one per core, so timeouts stay fair

    def for_run(self, config: Any) -> Task:
        from pixtral.eval.sandbox import Sandbox, SandboxLimits

        try:
            sandbox = Sandbox(config.sandbox or SandboxLimits())
        except (RuntimeError, OSError) as exc:  # not even a plain child process with limits can run here
            raise BackendError(f"humaneval: cannot run the samples in a sandbox on this machine ({exc})") from exc
        slots = min(64, max(1, os.cpu_count() or 1))
        return replace(self, sandbox=sandbox, slots=threading.BoundedSemaphore(slots))

    def settings(self) -> dict[str, Any]:
        return {"sandbox": self.sandbox.describe()} if self.sandbox is not None else {}

    def query(self, item: Any, backend: Any, decoding: Decoding, partial: Any = None) -> list[str]:
        return self.sample(item, backend, decoding, partial)

    @property
    def score_keys(self) -> tuple[str, ...]:
        return ("pass@1",)

    def score(self, answer: Any, reference: Any, previous: dict[str, Any] | None = None) -> ItemScore:
        """Each sample's program run in the sandbox; a saved execution of the same program under the same
        sandbox is reused (a resumed run does not execute again)."""
        from pixtral.eval import humaneval

        if self.sandbox is None:
            raise RuntimeError("HumanEvalTask.score needs the task from for_run(config) (it holds the sandbox)")
        described = self.sandbox.describe()
        saved = {}
        if previous and previous.get("sandbox") == described:
            saved = {e.get("program_sha256"): e for e in previous.get("executions") or []}
        executions = []
        for text in answer:
            code = humaneval.extract_code(text, reference["prompt"], reference["entry_point"])
            program = humaneval.program(code, reference["test"], reference["entry_point"])
            # An answer may hold lone surrogates, which no file can: they become their escapes.
            program = program.encode("utf-8", errors="backslashreplace").decode("utf-8")
            digest = hashlib.sha256(program.encode()).hexdigest()
            if digest in saved:
                executions.append(saved[digest])
                continue
            guarded, marker = humaneval.guarded(program)
            with self.slots:
                run = self.sandbox.run(guarded)
            status = run.status
            if status == "passed" and marker not in run.output:
                status = "failed"  # exited 0 without check() returning (os._exit)
            executions.append({"status": status, "returncode": run.returncode,
                               "output": run.output.replace(marker, "").rstrip()[-500:],
                               "elapsed_s": round(run.elapsed_s, 3), "program_sha256": digest})
        n = len(executions)
        passed = sum(e["status"] == "passed" for e in executions)
        scores = {f"pass@{k}": humaneval.pass_at_k(n, passed, k) for k in (1, 10, 100) if k <= n}
        return ItemScore(scores, {}, {"passed": passed, "samples": n},
                         {"executions": executions, "sandbox": described})

    def aggregate(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        ks = sorted({k for r in rows for k in (r.get("scores") or {})}, key=lambda k: int(k.split("@")[1]))
        result: dict[str, Any] = {k: _mean_of(rows, k) for k in ks or ["pass@1"]}
        statuses = Counter(e.get("status") for r in rows for e in r.get("executions") or [])
        result["executions"] = dict(sorted(statuses.items()))
        return result, {}


TASKS: dict[str, Task] = {
    "mt_bench": MTBenchTask("mt_bench", "mt_bench", headline="score"),
    "mmlu": MMLUTask("mmlu", "mmlu", headline="accuracy"),
    "math": MathTask("math", "math", headline="maj_at_k"),
    "humaneval": HumanEvalTask("humaneval", "humaneval", headline="pass@1"),
}
_registry.TASKS.update(TASKS)
