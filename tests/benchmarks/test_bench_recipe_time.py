"""benchmarks/bench_recipe_time.py: it knows the size of every file the recipe's stages read, counts
the data sets scripts/train_default_model.sh writes, and projects every stage against the target."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark imports its sibling `common`
    try:
        spec = importlib.util.spec_from_file_location("bench_recipe_time", REPO / "benchmarks" / "bench_recipe_time.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_sizes_cover_every_stage_and_match_the_script():
    bench = load_bench()
    stages = bench.stage_configs()
    assert [name for name, _ in stages] == [f"stage{k}" for k in range(1, 5)]
    read = {f for _, cfg in stages for f in cfg.data.train + cfg.data.val}
    assert read <= set(bench.LINES), read - set(bench.LINES)

    script = (REPO / "scripts" / "train_default_model.sh").read_text()
    variables = dict(re.findall(r"^(\w+)=(runs/\S+)$", script, re.M))
    writes = {}  # data folder -> --n of its `pixtral data synth` (the script's `synth` function)
    for out, n in re.findall(r"^synth (\S+) --n (\d+)", script, re.M):
        writes[variables.get(out.lstrip("$"), out)] = int(n)
    assert writes == bench.IMAGES
    heads = re.findall(r"head -n (\d+) \$(\w+)/(\S+) > \$\w+/(\S+)", script)
    assert len(heads) == 5
    for n, var, _, dest in heads:
        assert bench.LINES[f"{variables[var]}/{dest}"] == int(n), dest


def test_projects_every_stage_and_compares_with_the_target(capsys):
    load_bench().main(["--device", "cpu", "--steps", "1", "--images", "20", "--workers", "1", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| stage")]
    assert [row.split()[1] for row in rows] == [f"stage{k}" for k in range(1, 5)]
    assert "| stage1 (fp32, encoder frozen) | 20000 steps, 177000 lines |" in out
    total = next(line for line in out.splitlines() if line.startswith("| **total**"))
    assert "(target 3.0 h: " in total


def test_refuses_bad_counts():
    with pytest.raises(SystemExit, match="--steps must be at least 1, got 0"):
        load_bench().main(["--steps", "0"])
