"""Human-readable outputs of a run: the markdown summary table and the PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {
    "baseline": "Baseline (strict)",
    "flexible_level_1": "Flexible level 1",
    "flexible_level_2": "Flexible level 2",
    "flexible_level_3": "Flexible level 3",
    "anls": "ANLS (τ = 0.5)",
    "vqa_match": "VQA accuracy",
    "micro_average": "Micro average (1-10)",
    "unrated_turns": "Unrated turns",
    "score": "Score (1-10, mean over rated turns)",
    "rated_turns": "Rated turns",
    "unjudged_turns": "Turns not judged (--no-judge, or not answered)",
    "accuracy": "Accuracy (letter in the answer)",
    "macro_accuracy": "Macro accuracy (mean over subjects)",
    "logprob_accuracy": "Accuracy (likeliest letter, logprobs)",
    "macro_logprob_accuracy": "Macro accuracy (logprobs)",
    "no_letter": "Answers without a letter",
    "sample_accuracy": "Mean accuracy of the samples",
}
GROUP_TITLES = {"per_turn": "Turn", "per_category": "Category", "per_subject": "Subject", "per_level": "Level",
                "executions": "Program outcome"}
CHART_GROUP_LIMIT = 20  # groups with more entries (MMLU's 57 subjects) stay in the table only


def _is_judge(result: dict[str, Any]) -> bool:
    return "micro_average" in result["metrics"] or result["task"] == "mt_bench"


def _label(key: str, result: dict[str, Any]) -> str:
    if key == "maj_at_k":
        return f"maj@{result['settings'].get('samples', 1)}"
    return LABELS.get(key, key)


def _group_keys(metrics: dict[str, Any]) -> list[str]:
    """The per-group metrics, turns and categories first (as MM-MT-Bench has always shown them)."""
    keys = [k for k in ("per_turn", "per_category") if isinstance(metrics.get(k), dict) and metrics[k]]
    return keys + [k for k, v in metrics.items() if isinstance(v, dict) and v and k not in keys]


def _paper_rows(result: dict[str, Any]) -> list[str]:
    """Our figure beside the paper's Table 3 column for this task (the language tasks only)."""
    from pixtral.eval.language_tasks import PAPER_COLUMNS, PAPER_TABLE3
    from pixtral.eval.tasks import TASKS

    task = result["task"]
    if task not in PAPER_COLUMNS:
        return []
    headline = TASKS[task].headline
    ours = result["metrics"].get(headline)
    if ours is None:
        shown = "n/a"
    else:
        shown = f"{ours:.2f}" if task == "mt_bench" else f"{100 * ours:.1f}"
    label = _label(headline, result)
    lines = ["", f"Beside the paper's Table 3 ({PAPER_COLUMNS[task]}; the paper names no harness, so its "
             "figures come from protocols that may differ from ours in prompts and parsing):", "",
             f"| Model | {PAPER_COLUMNS[task]} |", "|---|---|", f"| **{model_name(result)}** (this run, {label}) | "
             f"**{shown}** |"]
    lines += [f"| {name} (paper) | {row[task]:g} |" for name, row in PAPER_TABLE3.items()]
    return lines


def _fmt(value: Any, judge: bool) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.2f}" if judge else f"{100 * value:.1f}%"


def model_name(result: dict[str, Any]) -> str:
    model = result["settings"]["model"]
    return model.get("served_model") or model.get("model") or "model"


def markdown(result: dict[str, Any]) -> str:
    judge = _is_judge(result)
    metrics = result["metrics"]
    counts = result["counts"]
    lines = [f"# {result['task']}: {model_name(result)}", "", "| Metric | Value |", "|---|---|"]
    for key, value in metrics.items():
        if not isinstance(value, dict):
            lines.append(f"| {_label(key, result)} | {_fmt(value, judge)} |")
    lines += _paper_rows(result)
    for key in _group_keys(metrics):
        groups = metrics[key]
        title = GROUP_TITLES.get(key, key)
        first = next(iter(groups.values()))
        if isinstance(first, dict):  # accuracy per group: one column per metric
            columns = [c for c in first if c != "count"]
            lines += ["", f"| {title} | n | {' | '.join(_label(c, result) for c in columns)} |",
                      "|---|---|" + "---|" * len(columns)]
            for name, values in groups.items():
                lines.append(f"| {name} | {values['count']} | {' | '.join(_fmt(values[c], False) for c in columns)} |")
        elif all(isinstance(v, int) for v in groups.values()):
            lines += ["", f"| {title} | Count |", "|---|---|"]
            lines += [f"| {name} | {value} |" for name, value in groups.items()]
        else:
            lines += ["", f"| {title} | Mean rating |", "|---|---|"]
            lines += [f"| {name} | {_fmt(value, True)} |" for name, value in groups.items()]
    if result.get("mistral_evals"):
        lines += ["", "Released harness (mistral-evals) metrics, for comparison:", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, judge)} |" for k, v in result["mistral_evals"].items()]
    settings = result["settings"]
    lines += [
        "",
        f"Items: {counts['items']} ({counts['records']} records); failed: {counts['failed']}"
        + (f"; unrated: {counts['unrated'] + counts['judge_failed']}" if judge else "")
        + f"; resumed from earlier runs: {counts['resumed']}.",
        f"Decoding: temperature {settings['temperature']}, max_tokens {settings['max_tokens']}"
        + (f"; {settings['samples']} samples per problem, seed {settings['seed']}" if settings.get("seed") is not None
           and settings.get("samples", 1) > 1 else "")
        + ("; the temperature of each category (FastChat)" if settings.get("temperature_by_category") else "")
        + ("; blank images" if settings["blank_images"] else "") + ".",
        f"Scoring: {settings['scoring']}.",
        f"Data: {result['data']['path']} (sha256 {result['data']['sha256'][:16]}).",
        "",
    ]
    return "\n".join(lines)


def _paper_figure(result: dict[str, Any]) -> float | None:
    """The paper's Pixtral 12B figure for a language task, on the chart's scale."""
    from pixtral.eval.language_tasks import PAPER_TABLE3

    return PAPER_TABLE3["Pixtral 12B"].get(result["task"])


def chart(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars: the task's metrics, per-category/per-turn values, and the released metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judge = _is_judge(result)
    scale = 1.0 if judge else 100.0
    bars: list[tuple[str, float, str]] = []
    for key, value in result["metrics"].items():
        if isinstance(value, float):  # counts (ints) are in the table only
            bars.append((_label(key, result), value * scale, "tab:blue"))
    for key in _group_keys(result["metrics"]):
        groups = result["metrics"][key]
        if len(groups) > CHART_GROUP_LIMIT or all(isinstance(v, int) for v in groups.values()):
            continue
        for name, value in groups.items():
            column = next((c for c in value if c != "count"), None) if isinstance(value, dict) else None
            headline = value.get(column) if isinstance(value, dict) else value
            if headline is not None:
                prefix = {"per_turn": "turn ", "per_level": "level "}.get(key, "")
                suffix = "" if judge or column is None else f" ({_label(column, result)})"
                bars.append((f"{prefix}{name}{suffix}", headline * scale, "tab:green"))
    paper = _paper_figure(result)
    if paper is not None:
        bars.append(("paper: Pixtral 12B", paper, "tab:orange"))
    for key, value in (result.get("mistral_evals") or {}).items():
        if value is not None and not key.endswith("_average"):  # its per-group means duplicate the green bars
            bars.append((f"mistral-evals: {key}", value * scale, "tab:gray"))
    height = max(2.0, 0.4 * len(bars) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height))
    labels = [b[0] for b in bars][::-1]
    values = [b[1] for b in bars][::-1]
    ax.barh(labels, values, color=[b[2] for b in bars][::-1])
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:.2f}" if judge else f" {value:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 10.5 if judge else 105)
    ax.set_xlabel("rating (1-10)" if judge else "score (%)")
    ax.set_title(f"{result['task']}: {model_name(result)} ({result['counts']['items']} items)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
