"""benchmarks/bench_serving.py end to end on a tiny model: our server and transformers' continuous batching
(in process) on the same chats; the tables parse, nothing fails, the greedy answers are compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "engine"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from tiny_model import build_checkpoint  # noqa: E402

import bench_serving  # noqa: E402

LABELS = [label for label, _ in bench_serving.ROWS]


def tables(out: str) -> dict[str, tuple[list[str], dict[str, list[str]], str]]:
    """workload -> (column names, row label -> cells, agreement line)."""
    found, lines = {}, out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("image:", "text-only:")) and "chats" in line:
            workload = line.split(":")[0]
            header = [c.strip() for c in lines[i + 1].strip("|").split("|")][1:]
            rows = {}
            j = i + 3
            while j < len(lines) and lines[j].startswith("|"):
                cells = [c.strip() for c in lines[j].strip("|").split("|")]
                rows[cells[0]] = cells[1:]
                j += 1
            found[workload] = (header, rows, lines[j])
    return found


def run(args: list[str], tmp_path: Path) -> tuple[str, list[dict]]:
    model = build_checkpoint(tmp_path / "tiny")
    out_json = tmp_path / "out.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--model", str(model),
                             "--hf-model", str(tmp_path / "hf"), "--requests", "3", "--rates", "inf", "--turns", "2",
                             "--json", str(out_json), *args],
                            capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "errors, first" not in result.stderr, result.stderr
    return result.stdout, json.loads(out_json.read_text())


def check(table, servers: list[str], requests: int) -> None:
    header, rows, agreement = table
    assert header == [f"{s} @ inf/s" for s in servers]
    assert list(rows) == LABELS
    assert all(len(cells) == len(servers) for cells in rows.values())
    assert rows["requests"] == [str(requests)] * len(servers)
    assert rows["errors"] == ["0"] * len(servers)
    for cells in rows.values():
        assert "-" not in cells  # every percentile measured: first turns and follow-ups
    if len(servers) > 1:
        assert agreement.startswith("greedy answers equal on ") and " vs ".join(servers) in agreement
        same, total = agreement.removeprefix("greedy answers equal on ").split(" requests")[0].split(" of ")
        assert int(total) == requests and 0 <= int(same) <= requests


def test_default_peers_on_a_tiny_model(tmp_path):
    # The default peers: pixtral and transformers-cb. The image chats run on ours only (transformers'
    # continuous batching takes no images), the text-only chats on both.
    out, summaries = run([], tmp_path)
    found = tables(out)
    assert set(found) == {"image", "text-only"}, out
    check(found["image"], ["pixtral"], 6)
    check(found["text-only"], ["pixtral", "transformers-cb"], 6)
    assert [(s["workload"], s["server"]) for s in summaries] == [
        ("image", "pixtral"), ("text-only", "pixtral"), ("text-only", "transformers-cb")]
    for s in summaries:
        assert s["requests"] == 6 and s["errors"] == 0 and s["rate"] == float("inf")
        assert s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0


def test_text_only(tmp_path):
    out, summaries = run(["--text-only"], tmp_path)
    found = tables(out)
    assert set(found) == {"text-only"}, out
    check(found["text-only"], ["pixtral", "transformers-cb"], 6)
    assert [s["server"] for s in summaries] == ["pixtral", "transformers-cb"]


def test_why_not_ready_names_torchvision(tmp_path):
    log = tmp_path / "transformers.log"
    log.write_text("Traceback\nImportError:\nPixtralProcessor requires the Torchvision library but it was not found\n")
    text = bench_serving.why_not_ready("transformers", log)
    assert "PixtralProcessor requires the Torchvision" in text and "reason:" in text and "transformers-cb" in text
