"""benchmarks/soak_server.py end to end on a tiny model: it runs, mixes every kind, loses nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "engine"))
from tiny_model import build_checkpoint  # noqa: E402


def test_soak_on_a_tiny_model(tmp_path):
    model = build_checkpoint(tmp_path / "tiny")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak_server.py"), "--model", str(model),
                             "--minutes", "0.25", "--clients", "4", "--seed", "3"],
                            capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "lost requests: 0" in out and "/health at the end: 200" in out
    kinds = next(line for line in out.splitlines() if line.startswith("by kind:"))
    for kind in ("valid", "extreme", "bad:", "disconnect", "slow headers"):
        assert kind in kinds, kinds
    statuses = next(line for line in out.splitlines() if line.startswith("by status:"))
    assert "200" in statuses and "400" in statuses and "500" not in statuses
