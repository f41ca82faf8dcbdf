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
}


def _is_judge(result: dict[str, Any]) -> bool:
    return "micro_average" in result["metrics"]


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
            lines.append(f"| {LABELS.get(key, key)} | {_fmt(value, judge)} |")
    for key in ("per_turn", "per_category"):
        if not isinstance(metrics.get(key), dict) or not metrics[key]:
            continue
        groups = metrics[key]
        first = next(iter(groups.values()))
        if isinstance(first, dict):  # accuracy per category: one column per metric
            columns = [c for c in first if c != "count"]
            lines += ["", f"| Category | n | {' | '.join(LABELS.get(c, c) for c in columns)} |",
                      "|---|---|" + "---|" * len(columns)]
            for name, values in groups.items():
                lines.append(f"| {name} | {values['count']} | {' | '.join(_fmt(values[c], False) for c in columns)} |")
        else:
            title = "Turn" if key == "per_turn" else "Category"
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
        + ("; blank images" if settings["blank_images"] else "") + ".",
        f"Scoring: {settings['scoring']}.",
        f"Data: {result['data']['path']} (sha256 {result['data']['sha256'][:16]}).",
        "",
    ]
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars: the task's metrics, per-category/per-turn values, and the released metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judge = _is_judge(result)
    scale = 1.0 if judge else 100.0
    bars: list[tuple[str, float, str]] = []
    for key, value in result["metrics"].items():
        if isinstance(value, (int, float)) and key != "unrated_turns" and value is not None:
            bars.append((LABELS.get(key, key), value * scale, "tab:blue"))
    for key in ("per_turn", "per_category"):
        for name, value in (result["metrics"].get(key) or {}).items():
            headline = value.get("baseline") if isinstance(value, dict) else value
            if headline is not None:
                prefix = "turn " if key == "per_turn" else ""
                suffix = "" if judge else " (baseline)"
                bars.append((f"{prefix}{name}{suffix}", headline * scale, "tab:green"))
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
