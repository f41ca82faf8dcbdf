"""research/scripts/rank_probe.py: it scores the labels of ranked chart documents, in ranked order."""

from __future__ import annotations

import math
import re

import pytest

from pixtral.assets import default_model_dir
from pixtral.data.synth import generate_sample
from pixtral.processing import load_processor
from conftest import load_script


@pytest.fixture(scope="module")
def probe():
    return load_script("rank_probe")


def test_label_positions_are_the_ranked_labels(probe, tmp_path):
    processor = load_processor(default_model_dir())
    for i in range(20):
        sample = generate_sample(5, i, "charts", layout="grid")
        path = tmp_path / "chart.png"
        sample.image.save(path)
        content = [{"type": "image_url", "image_url": {"url": str(path)}}, {"type": "text", "text": sample.ranked}]
        ids, _, is_text = processor.encode_document(content)
        pieces = [processor.decode([t]) for t in ids]
        labels = re.findall(r"([A-Z]) \d", sample.ranked.split(": ", 1)[1])
        positions = probe.label_positions(pieces, is_text, len(labels))
        assert [pieces[j].strip() for j in positions] == labels, sample.ranked


def test_prints_one_row_per_bar_count_and_rank(probe, capsys):
    assert probe.main(["--n", "12"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if re.match(r"^\| \d", line)]
    assert rows and sum(int(r[2]) for r in rows if r[1].strip() == "1") == 12  # every chart, rank 1
    for bars, rank, _, loss, guessing, _, _ in rows:
        assert 1 <= int(rank) < int(bars)  # the last label is forced, not scored
        assert float(guessing) == pytest.approx(math.log(int(bars) - int(rank) + 1), abs=1e-3)
        assert 0 <= float(loss) < 20


def test_rejects_bad_n(probe):
    with pytest.raises(Exception, match="--n must be at least 1"):
        probe.main(["--n", "0"])
