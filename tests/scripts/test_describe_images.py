"""scripts/describe_images.py: its scores of a description against the reference."""

from __future__ import annotations

import pytest

from pixtral.data.synth import generate_sample
from tests.scripts.conftest import load_script


@pytest.fixture(scope="module")
def describe():
    return load_script("describe_images")


def test_facts_do_not_depend_on_their_order(describe):
    checked = 0
    for i in range(100):
        sample = generate_sample(5, i)
        # Charts and documents word each fact the same way in both orders (tables, diagrams and
        # scenes key their facts differently, so a model is scored against documents like its own).
        if sample.category in ("charts", "documents"):
            assert describe.facts(sample.description) == describe.facts(sample.lookup), sample.description
            checked += 1
    assert checked == 40


def test_facts_bind_each_value_to_its_key(describe):
    assert dict(describe.facts("Document titled Memo. 1 follows Total. Room: 4.")) == {
        ("Document", "titled", "Memo"): 1, ("Total", "1"): 1, ("Room", "4"): 1}
    reference = "Bar chart Score, 3 bars: M 4, H 4, A 9."
    score = describe.score(reference, "Bar chart Score, 3 bars: A 9, H 4, M 5.")
    assert score["facts"] == (4, 5)  # title, count, A 9, H 4; not M 4
    assert score["glyph facts"] == (3, 4)  # the count "3 bars" holds a number too
    assert score["labels and values"][0] < score["labels and values"][1]  # in order, A/M swap fails
    assert describe.score(reference, "Bar chart Score, 3 bars: M 4, M 4, H 4, A 9.")["facts"] == (5, 5)
    assert describe.score(reference, reference)["exact"] == (1, 1)
