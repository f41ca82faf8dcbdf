"""MMLU: both data layouts, the exact 5-shot prompt, data errors, and answer scoring."""

import csv
import math
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pixtral.eval import mmlu
from pixtral.eval.errors import DataError


def dev_rows(subject, n=5):
    return [[f"{subject} dev q{i}?", f"a{i}", f"b{i}", f"c{i}", f"d{i}", "ABCD"[i % 4]] for i in range(n)]


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path


TRICKY = ['What does "x, y" mean?\nPick one.', "1, 2", 'say "hi"', "line one\nline two", "none", "C"]


def csv_layout(root, nested=False):
    base = root / "data" if nested else root
    write_csv(base / "dev" / "abstract_algebra_dev.csv", dev_rows("abstract_algebra"))
    write_csv(base / "dev" / "virology_dev.csv", dev_rows("virology", 6))
    write_csv(base / "test" / "virology_test.csv", [["V0?", "w", "x", "y", "z", "B"]])
    write_csv(base / "test" / "abstract_algebra_test.csv",
              [TRICKY, ["Q1?", "1", "2", "3", "4", "A"], ["Q2?", "p", "q", "r", "s", "D"]])
    return root


def parquet_layout(root, subjects=("anatomy", "astronomy"), dev_n=5, test_rows=None):
    (root / "all").mkdir(parents=True)
    dev = {"question": [], "subject": [], "choices": [], "answer": []}
    for s in subjects:
        for i in range(dev_n):
            dev["question"].append(f"{s} dev {i}")
            dev["subject"].append(s)
            dev["choices"].append([f"a{i}", f"b{i}", f"c{i}", f"d{i}"])
            dev["answer"].append(i % 4)
    test = test_rows or {
        "question": ["T0", "T1", "T2"],
        "subject": ["astronomy", "anatomy", "astronomy"],
        "choices": [["w", "x", "y", "z"]] * 3,
        "answer": [3, 0, 1],
    }
    pq.write_table(pa.table(dev), root / "all" / "dev-00000-of-00001.parquet")
    pq.write_table(pa.table(test), root / "all" / "test-00000-of-00001.parquet")
    # Files that must be ignored: other splits and per-subject configs.
    pq.write_table(pa.table({k: v[:1] for k, v in test.items()}), root / "all" / "validation-00000-of-00001.parquet")
    (root / "anatomy").mkdir()
    pq.write_table(pa.table({k: v[:1] for k, v in test.items()}), root / "anatomy" / "test-00000-of-00001.parquet")
    return root


# ------------------------------------------------------------------------------------------ load


def test_csv_layout_items_ids_and_quoted_fields(tmp_path):
    ds = mmlu.load(csv_layout(tmp_path))
    items = list(ds.items())
    assert ds.task == "mmlu" and ds.total == ds.records == 4
    assert [i.id for i in items] == ["abstract_algebra/0", "abstract_algebra/1", "abstract_algebra/2", "virology/0"]
    assert [i.reference for i in items] == ["C", "A", "D", "B"]
    assert [i.meta for i in items][-1] == {"subject": "virology"}
    first = items[0].messages
    assert len(first) == 1 and first[0]["role"] == "user"
    assert first[0]["content"].endswith(
        'What does "x, y" mean?\nPick one.\nA. 1, 2\nB. say "hi"\nC. line one\nline two\nD. none\nAnswer:')
    assert [f.name for f in ds.files] == ["abstract_algebra_dev.csv", "virology_dev.csv",
                                          "abstract_algebra_test.csv", "virology_test.csv"]
    assert len(ds.sha256) == 64


def test_csv_layout_under_data_folder(tmp_path):
    ds = mmlu.load(csv_layout(tmp_path, nested=True))
    assert [i.id for i in ds.items()][-1] == "virology/0"


def test_exact_prompt_text(tmp_path):
    items = list(mmlu.load(csv_layout(tmp_path)).items())
    virology = items[-1].messages[0]["content"]
    assert virology == (
        "The following are multiple choice questions (with answers) about virology.\n\n"
        "virology dev q0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\n"
        "virology dev q1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: B\n\n"
        "virology dev q2?\nA. a2\nB. b2\nC. c2\nD. d2\nAnswer: C\n\n"
        "virology dev q3?\nA. a3\nB. b3\nC. c3\nD. d3\nAnswer: D\n\n"
        "virology dev q4?\nA. a4\nB. b4\nC. c4\nD. d4\nAnswer: A\n\n"
        "V0?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    )  # only the first 5 of virology's 6 dev rows
    assert items[0].messages[0]["content"].startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "abstract_algebra dev q0?\nA. a0\n")


def test_parquet_layout(tmp_path):
    ds = mmlu.load(parquet_layout(tmp_path))
    items = list(ds.items())
    assert [i.id for i in items] == ["anatomy/0", "astronomy/0", "astronomy/1"]
    assert [i.reference for i in items] == ["A", "D", "B"]
    assert [f.relative_to(tmp_path).as_posix() for f in ds.files] == [
        "all/dev-00000-of-00001.parquet", "all/test-00000-of-00001.parquet"]
    text = items[1].messages[0]["content"]
    assert text.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n"
                           "astronomy dev 0\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\n")
    assert text.endswith("\n\nT0\nA. w\nB. x\nC. y\nD. z\nAnswer:")


def test_limit_takes_first_items_overall(tmp_path):
    full = mmlu.load(csv_layout(tmp_path))
    part = mmlu.load(tmp_path, limit=2)
    assert part.total == part.records == 2
    assert [i.id for i in part.items()] == ["abstract_algebra/0", "abstract_algebra/1"]
    assert part.sha256 == full.sha256
    assert mmlu.load(tmp_path, limit=0).total == 0


def test_missing_path_and_file_argument(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        mmlu.load(tmp_path / "nope")
    f = write_csv(tmp_path / "x.csv", [["q"]])
    with pytest.raises(DataError, match="not a file"):
        mmlu.load(f)


def test_error_too_few_dev_rows_names_subject_and_file(tmp_path):
    csv_layout(tmp_path)
    write_csv(tmp_path / "dev" / "virology_dev.csv", dev_rows("virology", 4))
    with pytest.raises(DataError) as err:
        mmlu.load(tmp_path)
    assert "'virology'" in str(err.value) and "virology_dev.csv" in str(err.value) and "found 4" in str(err.value)


def test_error_no_dev_file_for_subject(tmp_path):
    csv_layout(tmp_path)
    (tmp_path / "dev" / "virology_dev.csv").unlink()
    with pytest.raises(DataError, match=r"'virology'.*virology_dev\.csv"):
        mmlu.load(tmp_path)


def test_error_parquet_subject_without_dev_rows(tmp_path):
    parquet_layout(tmp_path, subjects=("anatomy",))
    with pytest.raises(DataError, match=r"'astronomy'.*found 0"):
        mmlu.load(tmp_path)


@pytest.mark.parametrize("row, field", [
    (["Q?", "a", "b", "c", "D"], "expected 6 columns"),
    (["Q?", "a", "b", "c", "d", "e", "A"], "expected 6 columns"),
    (["Q?", "a", "b", "c", "d", "E"], "field 'answer'"),
    (["Q?", "a", "b", "c", "d", "1"], "field 'answer'"),
])
def test_error_bad_csv_rows_name_file_row_field(tmp_path, row, field):
    csv_layout(tmp_path)
    write_csv(tmp_path / "test" / "virology_test.csv", [["V0?", "w", "x", "y", "z", "B"], row])
    with pytest.raises(DataError) as err:
        mmlu.load(tmp_path)
    msg = str(err.value)
    assert "virology_test.csv row 1 (line 2)" in msg and field in msg


def test_error_csv_not_utf8_and_no_test_files(tmp_path):
    csv_layout(tmp_path)
    (tmp_path / "test" / "virology_test.csv").write_bytes(b"\xff\xfe\x00bad,\n")
    with pytest.raises(DataError, match="virology_test.csv: cannot read as CSV"):
        mmlu.load(tmp_path)
    for f in (tmp_path / "test").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="no <subject>_test.csv"):
        mmlu.load(tmp_path)


BASE_TEST = {"question": ["T0"], "subject": ["anatomy"], "choices": [["w", "x", "y", "z"]], "answer": [0]}


@pytest.mark.parametrize("change, field", [
    ({"answer": [4]}, "field 'answer'"),
    ({"answer": [-1]}, "field 'answer'"),
    ({"choices": [["w", "x", "y"]]}, "field 'choices'"),
    ({"choices": [["w", "x", "y", "z", "v"]]}, "field 'choices'"),
    ({"question": [None]}, "field 'question'"),
    ({"subject": [""]}, "field 'subject'"),
])
def test_error_bad_parquet_rows_name_file_row_field(tmp_path, change, field):
    parquet_layout(tmp_path, subjects=("anatomy",), test_rows={**BASE_TEST, **change})
    with pytest.raises(DataError) as err:
        mmlu.load(tmp_path)
    assert "test-00000-of-00001.parquet row 0" in str(err.value) and field in str(err.value)


def test_error_parquet_missing_column(tmp_path):
    parquet_layout(tmp_path, subjects=("anatomy",), test_rows={k: v for k, v in BASE_TEST.items() if k != "choices"})
    with pytest.raises(DataError, match="missing column.*choices"):
        mmlu.load(tmp_path)


def test_subject_categories_are_hendrycks():
    assert len(mmlu.SUBJECT_CATEGORIES) == 57
    assert Counter(mmlu.SUBJECT_CATEGORIES.values()) == {"STEM": 18, "humanities": 13, "social sciences": 12,
                                                         "other": 14}
    assert mmlu.SUBJECT_CATEGORIES["abstract_algebra"] == "STEM"
    assert mmlu.SUBJECT_CATEGORIES["professional_law"] == "humanities"
    assert mmlu.SUBJECT_CATEGORIES["high_school_psychology"] == "social sciences"
    assert mmlu.SUBJECT_CATEGORIES["virology"] == "other"
    assert mmlu.category_of("not_a_subject") is None


# ----------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) Paris", "B"), (" B", "B"), ("B\n", "B"), ("[C]", "C"),
    ("D: the mitochondria", "D"), ("B Paris", "B"), ("**B**", "B"), ("A. Paris", "A"), ("A", "A"),
    ("A is correct.", "A"),
    ("The answer is (B)", "B"), ("The answer is B.", "B"), ("Answer: B", "B"), ("answer: C", "C"),
    ("**Answer:** C", "C"), ("The correct answer is: (D) 42", "D"), ("The answer would be option C.", "C"),
    ("So the answer is A because the group is cyclic.", "A"), ("$\\boxed{D}$", "D"),
    ("Let me think. Option A is wrong and option B is wrong, so the answer is C.", "C"),
    ("B\n\nExplanation: option A ignores friction.", "B"), ("B. The answer is B.", "B"),
    ("I would pick C.", "C"), ("It must be (D), since the others fail.", "D"),
    ("A cell wall is found in plants, so C.", "C"),
    ("C, because x > 0", "C"),
])
def test_extract_letter(answer, letter):
    assert mmlu.extract_letter(answer) == letter


@pytest.mark.parametrize("answer", [
    "A or B", "B/C", "(A) or (B)", "C, D",
    "I think C... no, D",  # a self-correction: two letters, we do not guess
    "B. Actually, the answer is C.",  # leading letter and explicit statement disagree
    "The answer is A. No wait, the answer is B.",
    "I don't know.", "", "   ", "None of the above", "b", "A cell wall.", "The answer is a mystery",
    None, 42,
])
def test_extract_letter_none(answer):
    assert mmlu.extract_letter(answer) is None


def test_letter_from_top_logprobs():
    top = [("B", -0.5), (" B", -0.2), ("C", -1.0), ("The", -0.1), ("b", 0.0), ("AB", -0.01)]
    letter, scores = mmlu.letter_from_top_logprobs(top)
    assert letter == "B" and scores == {"B": -0.2, "C": -1.0}
    assert list(scores) == ["B", "C"]  # A..D order, missing letters absent


def test_letter_from_top_logprobs_none_present_and_empty():
    assert mmlu.letter_from_top_logprobs([("The", -0.1), ("answer", -2.0)]) == (None, {})
    assert mmlu.letter_from_top_logprobs([]) == (None, {})
    assert mmlu.letter_from_top_logprobs(None) == (None, {})


def test_letter_from_top_logprobs_ties_and_bad_entries():
    assert mmlu.letter_from_top_logprobs([("D", -1.0), (" C", -1.0), ("B", -2.0)]) == (
        "C", {"B": -2.0, "C": -1.0, "D": -1.0})
    assert mmlu.letter_from_top_logprobs([(" D", -0.3), ("A", -0.3)])[0] == "A"
    letter, scores = mmlu.letter_from_top_logprobs(
        [("A", math.nan), ("B", "x"), (None, -0.1), ("C",), ("D\n", -3.0)])
    assert letter == "D" and scores == {"D": -3.0}
