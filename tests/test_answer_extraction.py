"""Table-driven GSM8K / MATH extraction cases with hand-written expected values."""

from __future__ import annotations

import pytest

from evaluation.answer_extraction import (
    extract_answer_number,
    extract_answer_number_flexible,
    extract_math_answer,
    extract_math_answer_flexible,
    gsm8k_gold_answer,
    last_boxed_only_string,
    math_gold_answer,
    remove_boxed,
    remove_boxed_flexible,
)

PAPER_CASES = [
    ("Step 1 ... The answer is: 18", 18),
    ("The answer is: -3", -3),
    ("The answer is: +7", 7),
    ("The answer is: 1,000,000", 1000),  # one separator only: "1,000"
    ("The answer is: $1,234.50.", 1234),  # "1,234" matched, the ".50" is a second separator
    ("The answer is: 2.5", 2),  # banker's rounding
    ("The answer is: 3.5", 4),
    ("The answer is: 0.5", 0),
    ("The answer is: 7/2", 4),  # round(3.5) = 4
    ("The answer is: 5/2", 2),  # round(2.5) = 2
    ("The answer is: 5/0", 5),  # denominator "0" -> round(numerator)
    ("The answer is: 5 The answer is: 9", 9),  # text after the last marker
    ("The answer is: 12 apples, not 13", 12),  # first number after the marker
    ("The answer is: none", None),
    ("The answer is:18", None),  # marker needs the trailing space
    ("the answer is: 18", None),  # case-sensitive
    ("She makes 18 dollars.", None),  # no marker
    ("The answer is: " + "9" * 400, None),  # float overflow -> inf -> None
]

FLEXIBLE_CASES = [
    ("The answer is: 18", 18.0),
    ("The answer is: 1,000,000", 1_000_000.0),
    ("The answer is: $1,234.50.", 1234.5),
    ("The answer is: 2.5", 2.5),  # no rounding
    ("The answer is: 3/4", 0.75),
    ("The answer is 42.", 42.0),  # no colon
    ("The final answer is: -7", -7.0),
    ("So she makes 9 * 2 = 18 dollars.", 18.0),  # no marker: last number
    ("I got 7. The answer is unknown", 7.0),  # marker without a number: last number in the text
    ("The answer is: 5/0", None),
    ("no digits here", None),
]


@pytest.mark.parametrize(("completion", "expected"), PAPER_CASES)
def test_extract_answer_number_paper(completion, expected):
    assert extract_answer_number(completion) == expected


@pytest.mark.parametrize(("completion", "expected"), FLEXIBLE_CASES)
def test_extract_answer_number_flexible(completion, expected):
    assert extract_answer_number_flexible(completion) == expected


def test_gsm8k_gold_answer_strips_commas_and_rejects_missing_marker():
    assert gsm8k_gold_answer("Janet sells 9 eggs.\n#### 1,450,000") == 1_450_000
    with pytest.raises(ValueError, match="#### N"):
        gsm8k_gold_answer("no final line")


MATH_CASES = [
    ("Thus ... The answer is: \\frac{1}{2}.\nDone.", "\\frac{1}{2}"),  # cut at ".\n"
    ("The answer is: 5.", "5"),  # one trailing "." dropped
    ("The answer is:  3 ", "3"),
    ("The answer is: 2 The answer is: (1,2).", "(1,2)"),
    ("no marker \\boxed{4}", None),
]


@pytest.mark.parametrize(("completion", "expected"), MATH_CASES)
def test_extract_math_answer_paper(completion, expected):
    assert extract_math_answer(completion) == expected


def test_extract_math_answer_flexible_uses_boxed_when_marker_missing():
    assert extract_math_answer_flexible("so \\boxed{4} and \\fbox{5}") == "4"  # \boxed is preferred
    assert extract_math_answer_flexible("so \\fbox{5}") == "5"
    assert extract_math_answer_flexible("The answer is: \\boxed{7}.") == "7"
    assert extract_math_answer_flexible("nothing") is None


BOXED_CASES = [
    ("a \\boxed{\\frac{1}{2}} b", "\\boxed{\\frac{1}{2}}"),
    ("\\boxed{1} then \\boxed{2}", "\\boxed{2}"),
    ("only \\fbox{3}", "\\fbox{3}"),
    ("\\boxed{3", None),  # never closes
    ("no box", None),
]


@pytest.mark.parametrize(("text", "expected"), BOXED_CASES)
def test_last_boxed_only_string(text, expected):
    assert last_boxed_only_string(text) == expected


def test_remove_boxed_paper_vs_flexible():
    assert remove_boxed("\\boxed{x+1}") == "x+1"
    assert remove_boxed("\\fbox{3}") is None  # paper: \fbox answers are lost
    assert remove_boxed(None) is None
    assert remove_boxed_flexible("\\fbox{3}") == "3"
    assert remove_boxed_flexible("\\boxed 5") == "5"
    assert math_gold_answer("So $x=\\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
