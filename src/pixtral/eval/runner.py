"""Run one task against a backend: resume, concurrency, progress, and the output files.

Per-item results are appended to `TASK.items.jsonl` as they arrive (one JSON object a line; a later
line for the same id replaces an earlier one). A re-run with the same data, model and settings skips
every item that has an answer (and, for MM-MT-Bench, a judgement from the same judge), re-queries
failed items, and only re-judges answers whose judge changed or failed. Scores of resumed items are
recomputed from their saved answers, so a scoring fix applies without querying the model again.
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

from pixtral.eval import prompts
from pixtral.eval.backends import Backend, RequestFailed
from pixtral.eval.data import Item, loggable_messages
from pixtral.eval.errors import DataError, EndpointUnreachableError, ResumeError
from pixtral.eval.judge import Judge
from pixtral.eval.loaders import load
from pixtral.eval.tasks import TASKS, Task

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
        self._fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
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
    task: Task = TASKS[config.task]
    started = time.time()
    dataset = load(task.name, config.data, config.limit, config.blank_images)
    max_tokens = config.max_tokens or prompts.MAX_TOKENS[task.name]
    judge = judge if task.needs_judge else None
    paths = output_paths(config.output_dir, task.name)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        for path in paths.values():
            path.unlink(missing_ok=True)

    model_key = {"task": task.name, "data_sha256": dataset.sha256, **backend.identity, "max_tokens": max_tokens,
                 "temperature": prompts.TEMPERATURE, "blank_images": config.blank_images}
    judge_key = judge.identity if judge else None
    store = ResultStore(paths["items"])
    previous, unreadable = store.load()
    for row in previous.values():
        if row.get("model_key") != model_key:
            raise ResumeError(
                f"{paths['items']}: holds results of a different run ({_differences(row.get('model_key') or {}, model_key)}); "
                "pass --overwrite to replace them, or choose another --output-dir")
    warnings: list[str] = []
    if unreadable:
        warnings.append(f"{paths['items']}: skipped {unreadable} unreadable line(s); those items are queried again")

    rows: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    seen: set[str] = set()
    counts: Counter = Counter()
    totals: dict[str, float] = defaultdict(float)

    def process(item: Item, answer: str | None) -> dict[str, Any]:
        begin = time.monotonic()
        row: dict[str, Any] = {
            "id": item.id, "status": "ok", "model_key": model_key, "judge_key": judge_key,
            "request": {"messages": loggable_messages(item.messages), "max_tokens": max_tokens,
                        "temperature": prompts.TEMPERATURE},
            "reference": item.reference, "meta": item.meta,
        }
        if answer is None:
            try:
                answer = backend.complete(item.messages, max_tokens=max_tokens, temperature=prompts.TEMPERATURE)
            except RequestFailed as exc:
                row.update(status="failed", answer=None, error=str(exc), elapsed_s=round(time.monotonic() - begin, 3))
                return row
            row["queried"] = True
        row.update(_scored(task, item, answer))
        if judge is not None:
            try:
                judgement = judge.rate(item, answer)
            except (RequestFailed, EndpointUnreachableError) as exc:
                # Keep the model's answer; an unreachable judge still stops the run (see collect).
                row.update(status="judge_failed", judge={"rating": None, "error": str(exc)})
                if isinstance(exc, EndpointUnreachableError):
                    row["abort"] = exc
            else:
                row["judge"] = {"rating": judgement.rating, "rationale": judgement.rationale, "attempts": judgement.attempts}
                if judgement.rating is None:
                    row["status"] = "unrated"
        row["elapsed_s"] = round(time.monotonic() - begin, 3)
        return row

    def finish(row: dict[str, Any], progress: _Progress) -> None:
        row = rows[row["id"]] = _slim(row)
        for key, value in task.progress_values(row).items():
            totals[key] += value
        progress.advance(task.format_running(totals, len(rows)))

    checked = False
    abort: EndpointUnreachableError | None = None
    pending: set[Future] = set()
    with _Progress(config.progress, task.name, dataset.total) as progress, \
            ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="pixtral-eval") as pool:

        def stop(exc: EndpointUnreachableError) -> None:
            nonlocal abort
            if abort is None:
                abort = exc
                for other in pending:
                    other.cancel()

        def collect(done: set[Future]) -> None:
            for future in done:
                pending.discard(future)
                if future.cancelled():
                    continue
                try:
                    row = future.result()
                except EndpointUnreachableError as exc:
                    stop(exc)
                    continue
                if "abort" in row:
                    stop(row.pop("abort"))
                if row.pop("queried", False):
                    counts["queried"] += 1
                if judge is not None and row.get("judge") is not None:
                    counts["judged"] += 1
                store.append(row)
                finish(row, progress)

        try:
            for item in dataset.items():
                if abort is not None:
                    break
                if item.id in seen:
                    raise DataError(f"{config.data}: duplicate item id '{item.id}'")
                seen.add(item.id)
                order.append(item.id)
                prev = previous.get(item.id)
                stage = _stage(prev, judge_key)
                if stage == "done":
                    counts["resumed"] += 1
                    finish({**prev, **_scored(task, item, prev["answer"])}, progress)
                    continue
                if not checked:
                    warnings.extend(backend.check())
                    if judge is not None:
                        warnings.extend(judge.backend.check())
                    for message in warnings:
                        progress.log(f"warning: {message}")
                    checked = True
                while len(pending) >= 2 * config.concurrency:
                    collect(wait(pending, return_when=FIRST_COMPLETED).done)
                pending.add(pool.submit(process, item, prev["answer"] if stage == "judge" else None))
            while pending:
                collect(wait(pending, return_when=FIRST_COMPLETED).done)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            store.close()

    if abort is not None:
        raise EndpointUnreachableError(
            f"{abort}; {len(rows)} of {dataset.total} items are saved in {paths['items']}: run the same command "
            "again to resume") from abort
    if not order:
        raise DataError(f"{config.data}: no items to evaluate")

    final = [rows[i] for i in order]
    metric_values, released = task.aggregate(final)
    statuses = Counter(r["status"] for r in final)
    result = {
        "task": task.name,
        "metrics": metric_values,
        "mistral_evals": released,
        "counts": {
            "items": len(final), "records": dataset.records, "ok": statuses["ok"], "failed": statuses["failed"],
            "unrated": statuses["unrated"], "judge_failed": statuses["judge_failed"],
            "resumed": counts["resumed"], "queried": counts["queried"], "judged": counts["judged"],
            "failed_items": [r["id"] for r in final if r["status"] == "failed"],
        },
        "settings": {
            "model": backend.describe(), "temperature": prompts.TEMPERATURE, "max_tokens": max_tokens,
            "concurrency": config.concurrency, "limit": config.limit, "blank_images": config.blank_images,
            "judge": judge.describe() if judge else None, "scoring": SCORING_NOTES[task.kind],
            "numeric_tolerance": task.tolerance if task.kind == "levels" else None,
        },
        "data": {"path": str(config.data), "files": [str(f) for f in dataset.files], "sha256": dataset.sha256},
        "run": {"started": _iso(started), "finished": _iso(time.time()), "elapsed_s": round(time.time() - started, 2),
                "pixtral": _version(), "warnings": warnings},
        "outputs": {k: p.name for k, p in paths.items()},
    }
    paths["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    from pixtral.eval import report

    paths["summary"].write_text(report.markdown(result), encoding="utf-8")
    report.chart(result, paths["chart"])
    return result


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


def _scored(task: Task, item: Item, answer: str) -> dict[str, Any]:
    score = task.score(answer, item.reference)
    return {"answer": answer, "extracted": score.extracted, "scores": score.scores, "mistral_evals": score.mistral_evals}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("pixtral")
    except Exception:
        return None
