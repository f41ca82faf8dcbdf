"""Metric unit tests built from the examples in docs/evaluation.md (parsing levels, metrics, released harness)."""

import pytest

from pixtral.eval import metrics
from pixtral.eval import mistral_evals as released
from pixtral.eval.parsing import extract_answer, gold_appears, parse_number, strip_end_punctuation

# ------------------------------------------------- released harness: docs/evaluation.md's table

SANITY_TABLE = [
    # (response, gold, explicit, anywhere)
    ("The chart shows it.\nFinal Answer: 6.0", "6", 1, 1),
    ("Final Answer: 6.3", "6", 1, 1),  # exactly 5% off
    ("Final Answer: 25%", "0.25", 1, 1),
    ("Final Answer: B. 12 cm", "B", 1, 1),  # first character
    ("**Answer:** B", "B", 1, 1),
    ("*Answer: B*", "B", 1, 1),
    ("Answer: C", "C", 1, 1),
    ("The answer is 6.", "6", 0, 1),
    ("The answer is 6000.", "6", 0, 1),  # over-generous, as designed
    ("Final Answer: Yes.", "Yes", 0, 0),  # trailing period kept on text
    ("Final Answer: $1,200", "1200", 1, 1),
    ("The correct option is B.", "B", 0, 0),  # case bug
]


@pytest.mark.parametrize("response,gold,explicit,anywhere", SANITY_TABLE)
def test_released_relaxed_metrics_match_the_documented_table(response, gold, explicit, anywhere):
    assert released.explicit_prompt_relaxed_correctness(response, [gold]) == explicit
    assert released.anywhere_in_answer_relaxed_correctness(response, [gold]) == anywhere


def test_released_extraction_takes_last_answer_and_strips_markdown():
    assert released.extract_final_answer("Answer: 3\nmore\nFinal Answer: [7]") == "7"
    assert released.extract_final_answer("Answer**:** (B)") == "B"
    assert released.extract_final_answer("Final answer:\n\n  42 \nbye") == "42"
    assert released.extract_final_answer("no colon here") == ""


def test_released_relaxed_correctness_details():
    assert released.relaxed_correctness("0", ["0"]) == 1  # gold 0 needs an exact 0
    assert released.relaxed_correctness("0.001", ["0"]) == 0
    assert released.relaxed_correctness("6.31", ["6"]) == 0  # just over 5%
    assert released.relaxed_correctness("'paris'", ["Paris"]) == 1  # quotes off, case-insensitive
    assert released.relaxed_correctness("x", ["B", "x"]) == 1  # max over golds
    assert released.relaxed_correctness("Bananas", ["B"]) == 1  # first-character rule


def test_released_anywhere_number_forms():
    assert released.anywhere_in_answer_relaxed_correctness("It was 1,000 units", ["1000"]) == 1
    assert released.anywhere_in_answer_relaxed_correctness("It rose 12%", ["12"]) == 1
    assert released.anywhere_in_answer_relaxed_correctness("the value is paris", ["Paris"]) == 1
    assert released.anywhere_in_answer_relaxed_correctness("The value is Paris", ["Paris"]) == 0


def test_released_anls_has_no_threshold():
    assert released.anls("The answer is 42", ["42"]) == pytest.approx(0.125)
    assert released.anls("completely unrelated text here", ["x"]) == pytest.approx(1 / 30, abs=1e-3)
    assert released.anls("42.", ["42"]) == 1.0  # trailing punctuation stripped
    assert released.anls("anything", []) == 0.0


def test_released_vqa_match_has_no_normalisation():
    assert released.vqa_match("Yes", ["yes"] * 10) == 0
    assert released.vqa_match("yes", ["yes"] * 10) == 1
    assert released.vqa_match('"2"', ["2", "2", "3"]) == pytest.approx(2 / 3)


def test_released_mm_mt_bench_macro_pools_categories_and_turns():
    scores = released.mm_mt_bench_aggregate([("charts", 0, 8), ("tables", 0, 6), ("tables", 1, 7.5)])
    assert scores["micro_average_score"] == pytest.approx(21.5 / 3)
    assert scores["charts_average"] == 8 and scores["tables_average"] == 6.75
    assert scores["0_average"] == 7 and scores["1_average"] == 7.5
    assert scores["macro_average_score"] == pytest.approx((8 + 6.75 + 7 + 7.5) / 4)


# ---------------------------------------------------------------- paper protocol: parsing levels


def test_baseline_requires_final_answer_at_the_end():
    assert extract_answer("Reasoning...\nFinal Answer: 42", 0) == "42"
    assert extract_answer("Reasoning...\nFinal Answer: 42\n", 0) == "42"
    assert extract_answer("Final Answer: 42\nHope this helps.", 0) is None
    assert extract_answer("Answer: 42", 0) is None
    assert extract_answer("final answer: 42", 0) is None  # exact spelling


def test_level_1_accepts_answer_colon():
    assert extract_answer("So.\nAnswer: 42", 1) == "42"
    assert extract_answer("So.\nFinal Answer: 42", 1) == "42"
    assert extract_answer("answer:\n42", 1) == "42"
    assert extract_answer("**Answer:** 42", 1) == "** 42"  # markdown is level 2's job


@pytest.mark.parametrize("response", ["**Answer**: B", "**Answer:** B", "*Answer: B*", "Answer: **B**",
                                      "**Final Answer:** B", "Answer**:** B"])
def test_level_2_strips_markdown(response):
    assert extract_answer(response, 2) == "B"


def score(response, gold, tolerance=0.0):
    return metrics.score_levels(response, [gold], tolerance)[0]


def test_levels_on_the_paper_examples():
    # gold "6": flexible metrics accept "6.0" and "The answer is 6".
    assert score("Final Answer: 6.0", "6")["baseline"] == 1  # numbers compare as numbers
    s = score("The answer is 6", "6")
    assert (s["baseline"], s["flexible_level_1"], s["flexible_level_2"], s["flexible_level_3"]) == (0, 0, 0, 1)
    # Level 3 is an upper bound: "6000" contains "6".
    assert score("I count 6000 of them.", "6")["flexible_level_3"] == 1
    s = score("Thinking\nAnswer: 6", "6")
    assert (s["baseline"], s["flexible_level_1"]) == (0, 1)
    s = score("Thinking\n**Answer:** 6", "6")
    assert (s["flexible_level_1"], s["flexible_level_2"], s["flexible_level_3"]) == (0, 1, 1)


def test_levels_are_cumulative():
    for response in ["Final Answer: 7", "Answer: 7", "**Answer:** 7", "it is 7", "nothing"]:
        s = score(response, "7")
        values = [s[level] for level in metrics.LEVELS]
        assert values == sorted(values)


def test_letter_answers():
    assert score("Final Answer: B", "B")["baseline"] == 1
    assert score("Final Answer: (B)", "B")["baseline"] == 1
    assert score("Final Answer: B. 12 cm", "B")["baseline"] == 1
    assert score("Final Answer: b", "B")["baseline"] == 1
    assert score("Final Answer: Bananas", "B")["baseline"] == 0  # unlike the released first-character rule
    assert score("The correct option is B.", "B")["flexible_level_3"] == 1  # no case bug
    assert score("Options: A, B, C. I pick\nB", "B")["flexible_level_3"] == 1
    assert score("This is a bar chart.", "A")["flexible_level_3"] == 0


def test_relaxed_numeric_match_only_with_tolerance():
    assert score("Final Answer: 6.3", "6", metrics.CHARTQA_TOLERANCE)["baseline"] == 1
    assert score("Final Answer: 6.31", "6", metrics.CHARTQA_TOLERANCE)["baseline"] == 0
    assert score("Final Answer: 6.3", "6")["baseline"] == 0  # MathVista/MMMU: exact numbers
    assert score("Final Answer: 25%", "0.25", metrics.CHARTQA_TOLERANCE)["baseline"] == 1
    assert score("Final Answer: 25%", "25", metrics.CHARTQA_TOLERANCE)["baseline"] == 1
    assert score("Final Answer: $1,200", "1200")["baseline"] == 1
    assert score("Final Answer: 0", "0", metrics.CHARTQA_TOLERANCE)["baseline"] == 1
    assert score("Final Answer: 0.01", "0", metrics.CHARTQA_TOLERANCE)["baseline"] == 0


def test_text_answers_ignore_case_quotes_and_trailing_period():
    assert score("Final Answer: Yes.", "Yes")["baseline"] == 1  # released scores this 0
    assert score('Final Answer: "United States"', "united states")["baseline"] == 1
    assert score("Final Answer: No", "Yes")["flexible_level_3"] == 0


def test_gold_appears_patterns():
    assert gold_appears("They are B", "B")
    assert gold_appears("the total is 1,500 dollars", "1500")
    assert gold_appears("the total is 1500 dollars", "1500")
    assert gold_appears("It's Annual Report", "annual report")
    assert not gold_appears("nothing", "7")


def test_parse_number():
    assert parse_number("1,200") == (1200.0, False)
    assert parse_number("$3.5") == (3.5, False)
    assert parse_number("25%") == (25.0, True)
    assert parse_number("-2") == (-2.0, False)
    assert parse_number("nan") is None and parse_number("12 cm") is None


def test_strip_end_punctuation_keeps_percent():
    assert strip_end_punctuation("12%.") == "12%"
    assert strip_end_punctuation("yes!? ") == "yes"


# ---------------------------------------------------------------------------------------- ANLS


def test_anls_threshold():
    assert metrics.anls("42", ["42"]) == 1.0
    assert metrics.anls("The answer is 42", ["42"]) == 0.0  # NL 0.875 >= 0.5
    assert metrics.anls("completely unrelated text here", ["x"]) == 0.0
    assert metrics.anls("Smyth", ["Dr. Smith", "smith"]) == pytest.approx(0.8)  # best gold, NL 0.2
    assert metrics.anls("abcd", ["abef"]) == 0.0  # NL exactly 0.5 is cut off
    assert metrics.anls("abcde", ["abcfg"]) == pytest.approx(0.6)
    assert metrics.anls("  INVOICE. ", ["invoice"]) == 1.0


def test_levenshtein():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == 3
    assert metrics.levenshtein("same", "same") == 0


# ---------------------------------------------------------------------------------------- VQA


def test_vqa_normalisation():
    assert metrics.vqa_normalize("Yes") == "yes"
    assert metrics.vqa_normalize("Two") == "2"
    assert metrics.vqa_normalize("The dog.") == "dog"
    assert metrics.vqa_normalize("dont") == "don't"
    assert metrics.vqa_normalize("1,000") == "1000"
    assert metrics.vqa_normalize("3.5") == "3.5"
    assert metrics.vqa_normalize("red-white") == "red white"


def test_vqa_accuracy_official_averaging():
    assert metrics.vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    assert metrics.vqa_accuracy("Two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert metrics.vqa_accuracy("red", ["red"] * 3 + ["dark red"] * 7) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("blue", ["red"] * 10) == 0.0
    assert metrics.vqa_accuracy("cat", ["cat"]) == 1.0  # a single gold: exact match
    assert metrics.vqa_accuracy("cat", []) == 0.0


# -------------------------------------------------------------------------------------- synth


def synth(response, gold):
    return metrics.score_short_answer(response, gold)[0]


def test_synth_levels():
    assert synth("42", "42") == dict.fromkeys(metrics.LEVELS, 1.0)
    assert synth("  Red  Car ", "red car")["baseline"] == 1
    s = synth("Answer: Alpha.", "Alpha")
    assert (s["baseline"], s["flexible_level_1"]) == (0, 1)
    s = synth("**3**", "3")
    assert (s["flexible_level_1"], s["flexible_level_2"]) == (0, 1)
    assert synth("3.0", "3")["flexible_level_2"] == 1
    s = synth("The title is Annual Report, at the top", "Annual Report")
    assert (s["flexible_level_2"], s["flexible_level_3"]) == (0, 1)
    assert synth("There are 13 rows", "3")["flexible_level_3"] == 0  # whole words only
    assert synth("blue", "red") == dict.fromkeys(metrics.LEVELS, 0.0)
