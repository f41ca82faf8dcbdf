"""Run one task against a backend: resume, concurrency, progress, and the output files.

Per-item results are appended to `TASK.items.jsonl` as they arrive (one JSON object a line; a later
line for the same id replaces an earlier one). A re-run with the same data, model and settings skips
every item that has an answer (and, for the judged tasks, a judgement from the same judge), re-queries
failed items (only their unfinished turns or samples), and only re-judges answers whose judge changed
or failed. Scores of resumed items are recomputed from their saved answers, so a scoring fix applies
without querying the model again (HumanEval reuses its saved executions while the sandbox is the same).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pixtral.eval.backends import Backend, RequestFailed
from pixtral.eval.data import Dataset, Item, loggable_messages
from pixtral.eval.errors import DataError, EndpointUnreachableError, ResumeError
from pixtral.eval.judge import Judge
from pixtral.eval.loaders import load
from pixtral.eval.tasks import TASKS, Decoding, Task

SCORING_NOTES = {
    "levels": "baseline = response ends with 'Final Answer: <answer>'; flexible levels 1-3 as in the paper's "
              "App. C (cumulative); numbers compare numerically, letters as options",
    "synth": "baseline = exact match after lower-casing and whitespace normalisation; level 1 drops an "
             "'Answer:' prefix, quotes and trailing punctuation; level 2 drops markdown and compares "
             "numbers; level 3 = answer appears as a whole word/phrase",
    "anls": "ANLS with threshold 0.5 (mistral_evals.anls: threshold 0, as released)",
    "vqa": "VQA accuracy: standard answer normalisation, official leave-one-out averaging of "
           "min(1, matches/3) (mistral_evals.vqa_match: as released, no normalisation)",
    "judge": "judge sees the question text, the reference answers as text, the image (unless disabled) "
             "and the answer; first [[n]] in 1-10; micro average over rated turns",
    "mt_bench": "FastChat single-answer grading (single-v1, single-math-v1 with the reference for math, reasoning "
                "and coding; multi-turn prompts for turn 2); [[n]], else [n], in 1-10; mean over rated turns",
    "mmlu": "letter read from the generated answer (leading letter or 'answer is X'; none when ambiguous); "
            "logprob accuracy: likeliest of A-D among the first answer token's top 20 logprobs",
    "math": "last \\boxed{} (else a 'final answer' line), Hendrycks/Minerva normalisation, exact numeric "
            "equivalence; maj@k: the most frequent answer (ties: the first seen) against the reference",
    "humaneval": "code from the answer's fenced block (the prompt prepended when only a body is given), run with "
                 "the tests in the sandbox; pass@k by the unbiased estimator",
}


@dataclass
class RunConfig:
    task: str
    data: str | Path
    output_dir: str | Path = "runs/eval"
    limit: int | None = None
    concurrency: int = 8
    max_tokens: int | None = None
    blank_images: bool = False
    overwrite: bool = False
    progress: bool = True
    samples: int = 1  # math and humaneval: answers per problem (maj@k, pass@k)
    temperature: float | None = None  # with samples > 1 (default: the task's); greedy otherwise
    seed: int = 0  # the samples' seeds derive from it and the item id
    sandbox: Any = None  # humaneval: `sandbox.SandboxLimits` (default limits when None)


def output_paths(output_dir: str | Path, task: str) -> dict[str, Path]:
    out = Path(output_dir)
    return {"json": out / f"{task}.json", "items": out / f"{task}.items.jsonl",
            "summary": out / f"{task}.md", "chart": out / f"{task}.png"}


class ResultStore:
    """`TASK.items.jsonl`: read what earlier runs saved, append new rows as they arrive."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def load(self) -> tuple[dict[str, dict[str, Any]], int]:
        """(latest row per id, number of unreadable lines, e.g. a line cut short by a crash)."""
        rows: dict[str, dict[str, Any]] = {}
        bad = 0
        if not self.path.exists():
            return rows, bad
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows[str(row["id"])] = _slim(row)
                except (json.JSONDecodeError, KeyError, TypeError):
                    bad += 1
        return rows, bad

    def append(self, row: dict[str, Any]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a+b")
            if self._fh.tell() > 0:  # after a crash the last line may lack its newline
                self._fh.seek(-1, 2)
                if self._fh.read(1) != b"\n":
                    self._fh.write(b"\n")
        # A lone surrogate in an answer becomes its JSON escape (`\ud800`), which reads back as it was.
        self._fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8", errors="backslashreplace"))
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _Progress:
    """A rich progress bar with the running score; a no-op when disabled."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[score]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.task_id = self.bar.add_task(description, total=total, score="")

    def __enter__(self) -> _Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar:
            self.bar.stop()

    def advance(self, score: str) -> None:
        if self.bar:
            self.bar.update(self.task_id, advance=1, score=score)

    def log(self, message: str) -> None:
        if self.bar:
            self.bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def evaluate(config: RunConfig, backend: Backend, judge: Judge | None = None) -> dict[str, Any]:
    """Evaluate `backend` on `config.task`; returns what is written to `TASK.json`.

    Raises `EndpointUnreachableError` (after saving every finished item) when an endpoint stops
    answering, and `DataError` / `ResumeError` for bad inputs.
    """
    task: Task = TASKS[config.task].for_run(config)
    started = time.time()
    dataset = load(task.name, config.data, config.limit, config.blank_images)
    decoding = task.decoding(config)
    judge = judge if task.needs_judge else None
    paths = _prepare_outputs(config, task.name)
    model_key = {"task": task.name, "data_sha256": dataset.sha256, **backend.identity,
                 "max_tokens": decoding.max_tokens, "temperature": decoding.temperature,
                 "blank_images": config.blank_images, **decoding.key()}
    store = ResultStore(paths["items"])
    previous, warnings = _load_previous(store, model_key)

    run = _Run(task, config, backend, judge, decoding, model_key, store, previous, warnings)
    run.run(dataset)
    if run.abort is not None:
        raise EndpointUnreachableError(
            f"{run.abort}; {len(run.rows)} of {dataset.total} items are saved in {paths['items']}: run the same "
            "command again to resume") from run.abort
    if not run.order:
        raise DataError(f"{config.data}: no items to evaluate")

    result = _result(run, dataset, paths, started)
    _write_outputs(result, paths)
    return result


def _prepare_outputs(config: RunConfig, task: str) -> dict[str, Path]:
    """The output paths, with their folder made (and earlier results removed with `overwrite`)."""
    paths = output_paths(config.output_dir, task)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        for path in paths.values():
            path.unlink(missing_ok=True)
    return paths


def _load_previous(store: ResultStore, model_key: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Earlier rows of this same run (by id), and warnings; ResumeError for rows of a different run."""
    previous, unreadable = store.load()
    for row in previous.values():
        if row.get("model_key") != model_key:
            raise ResumeError(
                f"{store.path}: holds results of a different run ({_differences(row.get('model_key') or {}, model_key)}); "
                "pass --overwrite to replace them, or choose another --output-dir")
    warnings: list[str] = []
    if unreadable:
        warnings.append(f"{store.path}: skipped {unreadable} unreadable line(s); those items are queried again")
    return previous, warnings


class _Run:
    """One pass over the dataset: resumed items are rescored, the others queried (and judged) in a thread
    pool, each row saved as it arrives. An unreachable endpoint sets `abort` and stops submitting."""

    def __init__(self, task: Task, config: RunConfig, backend: Backend, judge: Judge | None, decoding: Decoding,
                 model_key: dict[str, Any], store: ResultStore, previous: dict[str, dict[str, Any]],
                 warnings: list[str]):
        self.task, self.config, self.backend, self.judge = task, config, backend, judge
        self.decoding, self.model_key = decoding, model_key
        self.judge_key = judge.identity if judge else None
        self.store, self.previous, self.warnings = store, previous, warnings
        self.rows: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.counts: Counter = Counter()
        self.totals: dict[str, float] = defaultdict(float)
        self.abort: EndpointUnreachableError | None = None
        self._pending: set[Future] = set()
        self._checked = False
        self._progress: _Progress | None = None

    def run(self, dataset: Dataset) -> None:
        seen: set[str] = set()
        limit = 2 * self.config.concurrency  # submitted but not collected
        with _Progress(self.config.progress, self.task.name, dataset.total) as self._progress, \
                ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="pixtral-eval") as pool:
            try:
                for item in dataset.items():
                    if self.abort is not None:
                        break
                    if item.id in seen:
                        raise DataError(f"{self.config.data}: duplicate item id '{item.id}'")
                    seen.add(item.id)
                    self.order.append(item.id)
                    prev = self.previous.get(item.id)
                    stage = _stage(prev, self.judge_key)
                    if stage == "done":
                        self.counts["resumed"] += 1
                        self._finish({**prev, **_scored(self.task, item, prev["answer"], prev)})
                        continue
                    self._check_once()
                    while len(self._pending) >= limit:
                        self._collect(wait(self._pending, return_when=FIRST_COMPLETED).done)
                    self._pending.add(pool.submit(self._process, item, prev, stage))
                while self._pending:
                    self._collect(wait(self._pending, return_when=FIRST_COMPLETED).done)
            except BaseException:
                for future in self._pending:
                    future.cancel()
                raise
            finally:
                self.store.close()

    def _check_once(self) -> None:
        """Check the backends before the first query (not at all when everything is resumed)."""
        if self._checked:
            return
        self.warnings.extend(self.backend.check())
        if self.judge is not None:
            self.warnings.extend(self.judge.backend.check())
        for message in self.warnings:
            self._progress.log(f"warning: {message}")
        self._checked = True

    # ------------------------------------------------------------------ in the worker threads
    def _process(self, item: Item, prev: dict[str, Any] | None, stage: str) -> dict[str, Any]:
        """One item's row: the model's answer (queried unless saved), its scores and its judgement."""
        begin = time.monotonic()
        row: dict[str, Any] = {
            "id": item.id, "status": "ok", "model_key": self.model_key, "judge_key": self.judge_key,
            "request": self.task.request_log(item, self.decoding, loggable_messages(item.messages)),
            "reference": item.reference, "meta": item.meta,
        }
        if stage == "judge":
            answer = prev["answer"]
        else:
            try:
                answer = self.task.query(item, self.backend, self.decoding, (prev or {}).get("partial"))
            except (RequestFailed, EndpointUnreachableError) as exc:
                row.update(status="failed", answer=None, error=str(exc), elapsed_s=round(time.monotonic() - begin, 3))
                partial = getattr(exc, "partial", None)
                if partial:  # turns or samples that finished: saved, so the resume asks only for the rest
                    row["partial"] = partial
                if isinstance(exc, EndpointUnreachableError):
                    if not partial:
                        raise
                    row["abort"] = exc  # saved first, then the run stops (see _collect)
                return row
            row["queried"] = True
        row.update(_scored(self.task, item, answer, prev if stage == "judge" else None))
        if self.judge is not None:
            self._judge(item, answer, row)
        row["elapsed_s"] = round(time.monotonic() - begin, 3)
        return row

    def _judge(self, item: Item, answer: str, row: dict[str, Any]) -> None:
        try:
            judgement = self.judge.rate(item, answer)
        except (RequestFailed, EndpointUnreachableError) as exc:
            # Keep the model's answer; an unreachable judge still stops the run (see _collect).
            row.update(status="judge_failed", judge={"rating": None, "error": str(exc)})
            if isinstance(exc, EndpointUnreachableError):
                row["abort"] = exc
        else:
            row["judge"] = judgement.row()
            if not judgement.rated:
                row["status"] = "unrated"

    # ------------------------------------------------------------------ in the submitting thread
    def _collect(self, done: set[Future]) -> None:
        for future in done:
            self._pending.discard(future)
            if future.cancelled():
                continue
            try:
                row = future.result()
            except EndpointUnreachableError as exc:
                self._stop(exc)
                continue
            if "abort" in row:
                self._stop(row.pop("abort"))
            if row.pop("queried", False):
                self.counts["queried"] += 1
            if self.judge is not None and row.get("judge") is not None:
                self.counts["judged"] += 1
            self.store.append(row)
            self._finish(row)

    def _stop(self, exc: EndpointUnreachableError) -> None:
        if self.abort is None:
            self.abort = exc
            for other in self._pending:
                other.cancel()

    def _finish(self, row: dict[str, Any]) -> None:
        row = self.rows[row["id"]] = _slim(row)
        for key, value in self.task.progress_values(row).items():
            self.totals[key] += value
        self._progress.advance(self.task.format_running(self.totals, len(self.rows)))


def _result(run: _Run, dataset: Dataset, paths: dict[str, Path], started: float) -> dict[str, Any]:
    """What `TASK.json` holds: metrics, counts, settings, data and run information."""
    task, config, judge = run.task, run.config, run.judge
    final = [run.rows[i] for i in run.order]
    metric_values, released = task.aggregate(final)
    statuses = Counter(r["status"] for r in final)
    return {
        "task": task.name,
        "metrics": metric_values,
        "mistral_evals": released,
        "counts": {
            "items": len(final), "records": dataset.records, "ok": statuses["ok"], "failed": statuses["failed"],
            "unrated": statuses["unrated"], "judge_failed": statuses["judge_failed"],
            "resumed": run.counts["resumed"], "queried": run.counts["queried"], "judged": run.counts["judged"],
            "failed_items": [r["id"] for r in final if r["status"] == "failed"],
        },
        "settings": {
            "model": run.backend.describe(), "temperature": run.decoding.temperature,
            "max_tokens": run.decoding.max_tokens, **run.decoding.key(),
            "concurrency": config.concurrency, "limit": config.limit, "blank_images": config.blank_images,
            "judge": judge.describe() if judge else None, "scoring": SCORING_NOTES[task.kind],
            "numeric_tolerance": task.tolerance if task.kind == "levels" else None, **task.settings(),
        },
        "data": {"path": str(config.data), "files": [str(f) for f in dataset.files], "sha256": dataset.sha256},
        "run": {"started": _iso(started), "finished": _iso(time.time()), "elapsed_s": round(time.time() - started, 2),
                "pixtral": _version(), "warnings": run.warnings},
        "outputs": {k: p.name for k, p in paths.items()},
    }


def _write_outputs(result: dict[str, Any], paths: dict[str, Path]) -> None:
    from pixtral.eval import report

    paths["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["summary"].write_text(report.markdown(result), encoding="utf-8")
    report.chart(result, paths["chart"])


def _slim(row: dict[str, Any]) -> dict[str, Any]:
    """What a run keeps in memory per item (the file keeps everything)."""
    return {k: v for k, v in row.items() if k not in ("request", "extracted", "reference")}


def _stage(prev: dict[str, Any] | None, judge_key: dict[str, Any] | None) -> str:
    """'full' (query the model), 'judge' (re-judge the saved answer) or 'done'."""
    if prev is None or prev.get("status") == "failed" or prev.get("answer") is None:
        return "full"
    if judge_key is None:
        return "done"
    if prev.get("judge_key") != judge_key or prev.get("status") == "judge_failed" or not prev.get("judge"):
        return "judge"
    return "done"


def _scored(task: Task, item: Item, answer: Any, prev: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row's answer and scores; `prev` (a saved row of the same answer) lets a task reuse costly work."""
    score = task.score(answer, item.reference, prev)
    return {"answer": answer, "extracted": score.extracted, "scores": score.scores,
            "mistral_evals": score.mistral_evals, **score.extra}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("pixtral")
    except Exception:
        return None
