"""benchmarks/bench_structured.py on the default model, small: every mix runs its rows to max_tokens and
the mask is measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_runs_every_mix():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_structured", BENCH / "bench_structured.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        row = bench.bench("default", batch=2, new_tokens=8, reps=1)
    finally:
        sys.path.remove(str(BENCH))
    assert row["vocab"] == 4000
    assert all(row[k] > 0 for k in ("none", "half", "all", "mask_us"))
