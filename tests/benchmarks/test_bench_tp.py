"""bench_tp.py end to end on a tiny setting: both sizes run, and the report parses."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_tp.py"


def test_bench_tp_runs_tp1_and_tp2_and_reports_both(tmp_path):
    out = tmp_path / "tp.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "1,2", "--tokens", "4", "--repeats", "1",
                          "--batch", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| | TP=1 | TP=2 |" in run.stdout and "costs" in run.stdout
    results = json.loads(out.read_text())
    assert set(results) == {"1", "2"}
    for r in results.values():
        assert r["decode_step_ms_b1"] > 0 and r["decode_tok_s_b2"] > 0 and r["ttft_image_ms"] > 0
