r"""MATH answer extraction and comparison (pixtral.eval.math_answers): the Hendrycks and Minerva rules on
answers in the dataset's own styles, where we deliberately differ from them, maj@k voting and a fuzz run."""

import random
import time

import pytest

from pixtral.eval import math_answers as M
from pixtral.eval.math_answers import extract_answer, is_equiv, last_boxed, majority, normalize, reference_answer

# ------------------------------------------------------------------------------ equal pairs

EQUIVALENT = [
    # fractions and decimals (Hendrycks' 0.5 / a/b / \fracab rules, plus exact numeric equality)
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac12", r"\frac{1}{2}"),
    (r"\frac12", "0.5"),
    (r"\tfrac{1}{2}", "1/2"),
    ("1/2", r"\frac{1}{2}"),
    (".5", "0.5"),
    (r"\frac{3}{4}", "0.75"),
    (r"\dfrac{5}{4}", "1.25"),
    (r"-\frac{1}{2}", "-1/2"),
    (r"\frac{-1}{2}", "-0.5"),
    (r"\tfrac83", r"\frac{8}{3}"),
    (r"\frac34i", r"\frac{3}{4}i"),
    (r"\frac1{72}", r"\frac{1}{72}"),
    (r"\frac{72}1", "72"),
    (r"\frac{6}{3}", "2"),
    (r"2\frac{1}{2}", r"\frac{5}{2}"),  # MATH's mixed numbers
    (r"0.\overline{3}", r"\frac13"),  # a repeating decimal is exact
    (r"0.1\overline{6}", r"\frac{1}{6}"),
    ("5.0", "5"),
    ("18.90", "18.9"),
    ("+7", "7"),
    ("- 2", "-2"),
    # roots
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"),
    (r"10\sqrt{3} + \sqrt4", r"10\sqrt3 + \sqrt{4}"),
    (r"3 \sqrt 2", r"3\sqrt{2}"),
    (r"\sqrt[3]{2}", r"\sqrt[3]2"),
    (r"\frac{\sqrt{2}}{2}", r"\dfrac{\sqrt 2}{2}"),
    # percent, degrees, money, units (Hendrycks _strip_string / _remove_right_units, Minerva REMOVED_EXPRESSIONS)
    (r"10\%", "10"),
    ("10%", "10"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    ("90°", "90"),
    (r"30^\circ", "30 degrees"),
    (r"\$18.90", "18.90"),
    (r"\$ 18.90", "18.9"),
    (r"5\text{ cm}", "5"),
    (r"24\text{ cm}^2", "24"),
    (r"5 \text{cm}^2", "5"),
    (r"10\text{ units}", "10 "),
    (r"\frac{1}{4}\text{ inch}", "0.25"),
    (r"6\sqrt{2}\text{ units}", r"6\sqrt{2}"),
    ("18 dollars", "18"),
    ("4 square units", "4"),
    ("52 students", "52"),
    (r"2\text{ m}", "2"),
    (r"\mbox{5 cm}", "5"),
    (r"5^{\text{th}}", "5"),
    # prefixes, delimiters, boxes
    ("x = 3", "3"),
    ("k=-4", "-4"),
    (r"\theta = 30^\circ", "30"),
    ("y = 2x + 3", "2x+3"),
    (r"x \in [2,5)", "[2,5)"),
    ("$5$", "5"),
    (r"\(5\)", "5"),
    (r"\boxed{5}", "5"),
    (r"\boxed{\boxed{5}}", "5"),
    ("The answer is $12$.", "12"),
    ("7.", "7"),
    # thousands separators (Minerva), TeX spacing (Hendrycks \!, Minerva ,\! {,} \;)
    ("1,000", "1000"),
    (r"1,\!000", "1000"),
    (r"1{,}000", "1000"),
    (r"\$1{,}000.50", "1000.5"),
    ("10,000,000", "10000000"),
    (r"1\,000", "1000"),
    (r"x^2 + 7x + 10", "x^2+7x+10"),
    (r"\frac{1}{2}\!+\!\frac1{72}", r"\dfrac{1}{2} + \frac{1}{72}"),
    (r"\\dfrac{1}{2}", r"\frac12"),  # doubly escaped text (Hendrycks' `\\` rule)
    # brackets and lists (element-wise, same brackets, same order)
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"\left(x-2\right)\left(x+2\right)", "(x-2)(x+2)"),
    (r"(0.5, \sqrt 2)", r"\left(\frac12,\sqrt{2}\right)"),
    (r"\left[ \frac{1}{2}, 3 \right)", "[0.5,3)"),
    ("1, 2, 3", "1,2,3"),
    (r"(0,1)\cup(2,3)", r"(0, 1) \cup (2, 3)"),
    (r"(-\infty, 3]", r"\left(-\infty,3\right]"),
    (r"3\text{ and }4", "3, 4"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    # text answers (Minerva unwraps \text{}, \textbf{})
    (r"\text{Devon}", "Devon"),
    (r"\textbf{odd}", r"\text{odd}"),
    (r"\text{ even }", "even"),
    (r"\text{(A)}", "(A)"),
    (r"\textbf{(C)}", r"\text{(C)}"),
    # huge integers compare as strings (beyond int()'s digit limit)
    ("9" * 5000, "9" * 5000),
]


@pytest.mark.parametrize("prediction,reference", EQUIVALENT)
def test_equivalent_forms_match(prediction, reference):
    assert is_equiv(prediction, reference)
    assert is_equiv(reference, prediction)


# ------------------------------------------------------------------------------ unequal pairs

NOT_EQUIVALENT = [
    ("0.333", r"\frac13"),  # exact only: no tolerance
    ("0.33", r"0.\overline{3}"),
    ("0.5", r"\frac{1}{3}"),
    ("1/2", "2"),
    (r"10\text{ units}", "100 "),
    ("(1,2)", "(2,1)"),
    ("[0,1)", "(0,1)"),
    ("(0,1)", "[0,1]"),
    (r"(0,1)\cup(2,3)", r"(0,1)\cup[2,3)"),
    ("10, 4, -2", "4, 10, -2"),  # Hendrycks: order matters
    ("10, 4, 2", "4, 12, 2"),
    ("0.1, 4, 2", "4, .1, 2"),
    ("(1,2)", "(1,2,3)"),
    ("5x - 7y + 11z + 4 = 0", "x + y - z + 2 = 0"),  # Minerva's split("=")[-1] would match these
    ("x+y=0", "0"),
    ("2a + 3", "2 + 3"),  # Minerva's raw "a " removal would match these
    ("1,2", "12"),  # Minerva's comma rule would match these
    (r"0.\overline{3}", "0.3"),  # Minerva's \overline unwrapping would match these
    (r"\text{(A)}", "A"),  # neither protocol strips the parentheses of a choice
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{2}}{3}"),
    (r"\sqrt{3}", "3"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 12 \end{pmatrix}"),
    ("9" * 5000, "9" * 4999),
    ("-5", "5"),
    (r"\text{Devon}", "Evan"),
    ("", ""),
    (r"\boxed{}", "0"),
    ("2 m", "2"),  # a bare single letter may be a variable, not metres
    (r"\text{the second}", "the"),  # a unit word only counts after a quantity
    (r"2\text{ or }3", "2"),  # Hendrycks' `\text{ ` cut keeps joining words
]


@pytest.mark.parametrize("prediction,reference", NOT_EQUIVALENT)
def test_different_answers_do_not_match(prediction, reference):
    assert not is_equiv(prediction, reference)
    assert not is_equiv(reference, prediction)


def test_none_prediction_is_wrong():
    assert not is_equiv(None, "5")


@pytest.mark.parametrize(
    "answer,expected",
    [
        (r"\dfrac12", r"\frac{1}{2}"),
        ("0.5", r"\frac{1}{2}"),
        ("1/2", r"\frac{1}{2}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"\$1,000", "1000"),
        (r"5\text{ cm}", "5"),
        (r"\text{(A)}", "(A)"),
        ("x = 3.", "3"),
        (r"\sqrt3", r"\sqrt{3}"),
        (r"\frac{a}{b^{2}}", r"\frac{a}{b^{2}}"),
        ("1, 234", "1,234"),  # a list, not a thousands-grouped number
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_canonical_forms(answer, expected):
    assert normalize(answer) == expected


# ------------------------------------------------------------------------------ extraction

@pytest.mark.parametrize(
    "text,expected",
    [
        (r"So the answer is $\boxed{\frac{a}{b^{2}}}$.", r"\frac{a}{b^{2}}"),
        (r"$\boxed{\left( 3, \frac{\pi}{2} \right)}$", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"First $\boxed{1}$, then $\boxed{2}$.", "2"),
        (r"The result is $\boxed 5$.", "5"),
        (r"\fbox{4}", "4"),
        (r"\boxed{\boxed{3}}", "3"),
        (r"$\boxed{\{1,2\}}$", r"\{1,2\}"),
        (r"\boxed{1} and then \boxedfoo", "1"),
        ("no box at all", None),
        (r"truncated \boxed{\frac{1}{2", None),
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_reference_answer_is_the_last_box():
    solution = r"We have $x = \boxed{2}$ first; in all, $\boxed{\dfrac{\sqrt{3}}{2}}$."
    assert reference_answer(solution) == r"\dfrac{\sqrt{3}}{2}"
    for bad in ("The answer is 5.", r"\boxed{}", r"\boxed{5"):
        with pytest.raises(ValueError):
            reference_answer(bad)


@pytest.mark.parametrize(
    "response,expected",
    [
        (r"Thus $x = \boxed{7}$. Final Answer: 8", "7"),  # a box wins
        ("Final Answer: The final answer is $24$. I hope it is correct.", "24"),  # Minerva's form
        (r"Final Answer: The final answer is $-\frac{2}{3}$. I hope it is correct.", r"-\frac{2}{3}"),
        ("Work...\nFinal Answer: 7", "7"),
        ("**Final Answer:** $\\frac{1}{2}$", r"\frac{1}{2}"),
        ("Final Answer:\n\n9", "9"),
        ("The final answer is 12.", "12"),
        ("Some steps.\nAnswer: x = 3", "x = 3"),
        ("Some steps.\nThe answer is 3.", "3"),
        ("The answer is 3.\nBut let me double-check.", None),  # not the last line
        ("I am not sure.", None),
        ("", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extraction_end_to_end_grades_like_the_reference():
    solution = r"... so the probability is $\boxed{\frac{1}{2}}$."
    reference = reference_answer(solution)
    assert is_equiv(extract_answer(r"The probability is \boxed{0.5}."), reference)
    assert is_equiv(extract_answer("Final Answer: The final answer is $1/2$. I hope it is correct."), reference)
    assert not is_equiv(extract_answer(r"The probability is \boxed{0.50001}."), reference)
    assert not is_equiv(extract_answer("I give up."), reference)


# ------------------------------------------------------------------------------ majority vote

@pytest.mark.parametrize(
    "answers,expected",
    [
        (["0.5", r"\frac12", "1/2", "3"], ("0.5", 3)),  # equivalent forms vote together
        (["3", "0.5", r"\frac12"], ("0.5", 2)),
        (["1", "2", "2", "1"], ("1", 2)),  # a tie goes to the group seen first
        (["2", "1"], ("2", 1)),
        ([None, None], (None, 0)),
        ([], (None, 0)),
        ([None, "", "4"], ("4", 1)),  # None and empty answers never vote
        ([None, r"\boxed{5}", "5", "x = 5", "6"], (r"\boxed{5}", 3)),
        (["(1,2)", "(2,1)", r"\left(1, 2\right)"], ("(1,2)", 2)),
    ],
)
def test_majority(answers, expected):
    assert majority(answers) == expected


# ------------------------------------------------------------------------------ robustness

_PIECES = list("{}{}\\$^_.,/()[]=%0123456789 \nabx-+") + [
    "\\boxed", "\\boxed{", "\\boxed ", "\\fbox{", "\\frac", "\\dfrac", "\\sqrt", "\\sqrt[", "\\text{", "\\text{ ",
    "\\mbox{", "\\left(", "\\right)", "\\overline{", "\\\\", "\\!", "^\\circ", "\\%", "\\$", "{,}", "\\cup", "\\in",
    "Final Answer:", "final answer is", "answer:", "I hope it is correct.", " cm", " units", "\\text{and}", "\ue000",
]


def test_fuzz_never_raises_and_is_symmetric():
    rng = random.Random(1234)
    for _ in range(1500):
        a = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 40)))
        # the inner functions, so that the public wrappers' safety nets cannot hide a failure
        na, nb = M._normalize(a), M._normalize(b)
        assert M._equiv_normalized(na, nb) == M._equiv_normalized(nb, na)
        assert M._equiv_normalized(na, na) == bool(na)
        extract_answer(a)
        last_boxed(a)
        majority([a, b, None, a])


def test_adversarial_inputs_are_fast():
    big = "9" * 5000  # over Python's 4300-digit int() limit
    inputs = [
        big, "1" * 20000, "\\boxed{" + big + "}", "{" * 20000, "}" * 20000, "\\boxed{" * 5000, "\\frac" * 3000,
        "\\frac{" * 3000 + "1", "\\sqrt" * 4000, "$" * 10000, "\\text{" * 3000, "\\text{m}" * 1200, " cm" * 3000,
        "(" * 5000 + ")" * 5000, "1," * 4000, "\\text{ " * 2000, "a" * 9999 + " final answer is " + "x" * 9000,
        "\\overline{" * 1000, big + "/" + big, "0." + big + "\\overline{3}", "\\frac{" + big + "}{" + big + "}",
        "(" * 3000 + "1,2" + ")" * 3000, "\\left(" * 2000, "=" * 9000, "\\boxed " + "1" * 9000,
        "{" * 1000 + "\\frac12" + "}" * 1000, "\\frac{\\frac{" * 300 + "1" + "}{2}}" * 300, "x" * 200_000,
    ]
    start = time.perf_counter()
    for s in inputs:
        M._normalize(s)
        extract_answer(s)
        last_boxed(s)
        is_equiv(s, s + "1")
        majority([s, s, "1"])
    assert time.perf_counter() - start < 3.0
