"""scripts/answer_errors.py: where a wrong answer to a lookup question comes from on the page."""

from __future__ import annotations

import pytest

from tests.scripts.conftest import load_script

TABLE = "Table, 3 items, columns A M. Salt: 6 2. Soup: 2 6. Milk: 5 1."
DOCUMENT = "Document titled Budget. Floor: 8. Room: 4. Level: 9."


@pytest.fixture(scope="module")
def errors():
    return load_script("answer_errors")


def test_table_facts(errors):
    assert errors.table_facts(TABLE) == (["A", "M"], {"Salt": ["6", "2"], "Soup": ["2", "6"], "Milk": ["5", "1"]})


@pytest.mark.parametrize("item, answer, kind", [
    ("Salt", "5", "in column C not row R"),   # Milk's value in column A (Salt's is 6)
    ("Salt", "2", "in column C and row R"),   # Soup's value in column A, and Salt's in column M
    ("Milk", "1", "in row R not column C"),   # Milk's value in column M (Milk's in A is 5)
    ("Salt", "9", "in neither"),
])
def test_a_wrong_cell_value_by_its_row_and_column(errors, item, answer, kind):
    assert errors.kind_of_error("tables.cell", f"What is the value for {item} in column A?", answer, TABLE) == kind


def test_other_templates(errors):
    largest = "Which item has the largest value in column M?"
    assert errors.kind_of_error("tables.largest", largest, "Milk", TABLE) == "an item of the table"
    assert errors.kind_of_error("tables.largest", largest, "Tea", TABLE) == "not an item of the table"
    after = "What number comes after the word Room?"
    assert errors.kind_of_error("documents.after", after, "9", DOCUMENT) == "another field's number"
    assert errors.kind_of_error("documents.after", after, "7", DOCUMENT) == "not a number on the page"
    which = "Which word is followed by the number 4?"
    assert errors.kind_of_error("documents.which", which, "Floor", DOCUMENT) == "another field word"
    assert errors.kind_of_error("documents.which", which, "Price", DOCUMENT) == "not a field word on the page"


def test_missing_files_are_named(errors, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["answer_errors.py", "--data", str(tmp_path), "--items", str(tmp_path / "x.jsonl")])
    with pytest.raises(SystemExit) as exit_info:
        errors.main()
    assert str(exit_info.value) == f"error: {tmp_path / 'manifest.json'} not found"


def test_items_from_another_data_set_are_refused(errors, tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text('{"seed": 3, "layout": "grid", "questions": "some"}')
    (tmp_path / "test.jsonl").write_text('{"id": "test-0", "category": "tables", "templates": [], "messages": []}\n')
    items = tmp_path / "items.jsonl"
    items.write_text('{"id": "test-7:0", "answer": "3", "scores": {"baseline": 0}}\n')
    monkeypatch.setattr("sys.argv", ["answer_errors.py", "--data", str(tmp_path), "--items", str(items)])
    with pytest.raises(SystemExit) as exit_info:
        errors.main()
    assert "'test-7:0'" in str(exit_info.value) and "another data set" in str(exit_info.value)
