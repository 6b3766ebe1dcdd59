"""MergeLM's HumanEval / MBPP completion clean-up, literal in -> literal out."""

from __future__ import annotations

import pytest

from evaluation.code_postprocess import (
    completion_from_generation,
    postprocess_humaneval_completion,
    postprocess_mbpp_completion,
)

FENCED = "Here you go:\n```python\ndef f():\n    return 1\n```\nIt returns 1."

HUMANEVAL_CASES = [
    (FENCED, "def f():\n    return 1"),
    ("```python\ndef f():\n    return 1", "\ndef f():\n    return 1"),  # no closing fence: left unstripped
    ('def f():\n    return 1\n\nif __name__ == "__main__":\n    print(f())', "def f():\n    return 1"),
    ("def f():\n    return 1\n\n# Example usage\nprint(f())", "def f():\n    return 1"),
    ("The solution is: def f(): pass\n\nThe answer is: other", "def f(): pass"),
    # every "The answer is:" is removed first, so the "\n\nThe answer is:" cut never happens (MergeLM quirk)
    ("The answer is: x = 1\n\nThe answer is: y", "x = 1\n\n y"),
    ("def f():\r\n    return 1\r\n", "def f():\n    return 1"),
    ("    return 1\n", "return 1"),  # MergeLM strips, which drops the body's first indentation
]


@pytest.mark.parametrize(("completion", "expected"), HUMANEVAL_CASES)
def test_postprocess_humaneval(completion, expected):
    assert postprocess_humaneval_completion(completion) == expected


MBPP_CASES = [
    (FENCED, "def f():\n    return 1"),
    ("```python\ndef f():\n    return '```'\n```", "def f():\n    return '```'"),  # closing fence is "\n```"
    ("def f():\n    return 1\n# Test examples\nassert f() == 1", "def f():\n    return 1"),
    ("def f():\r\n    return 1", "def f():\r\n    return 1"),  # no \r removal for MBPP
    ("def f():\n    return 1\n# Example usage\nf()", "def f():\n    return 1"),
]


@pytest.mark.parametrize(("completion", "expected"), MBPP_CASES)
def test_postprocess_mbpp(completion, expected):
    assert postprocess_mbpp_completion(completion) == expected


def test_humaneval_fence_cuts_at_first_backticks():
    assert postprocess_humaneval_completion("```python\nx = '```'\n```") == "x = '"


def test_completion_from_generation_keeps_text_after_last_response_marker_and_untabs():
    assert completion_from_generation("### Response: a ### Response:\tdef f():\n\t\treturn 1") == (
        "    def f():\n        return 1"
    )
    assert completion_from_generation("no marker") == "no marker"
