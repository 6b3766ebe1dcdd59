"""Answer extraction from model completions: GSM8K numbers and MATH ``\\boxed{}`` answers.

Two families live here, in one place:

* the paper's extraction, byte-for-byte MergeLM / WizardMath behaviour (``extract_answer_number``,
  ``extract_math_answer``, ``last_boxed_only_string``, ``remove_boxed``), which produces the reported
  ``accuracy``;
* a flexible extraction (``*_flexible``) that fixes the known weak points listed in the MergeLM
  specification (all thousands separators, no rounding, a missing "The answer is:" marker, ``\\fbox``),
  reported as the extra metric ``accuracy_flexible`` and never replacing ``accuracy``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from fractions import Fraction

ANSWER_MARKER = "The answer is: "

# MergeLM: one optional '.', ',' or '/' separator, so "1,000,000" is read as "1,000".
_PAPER_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")
# Flexible: any number of well-formed thousands groups, optional decimals, optional "/denominator".
_FLEX_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?")
_FLEX_MARKER = re.compile(r"the (?:final )?answer is\s*:?", re.IGNORECASE)


def _is_number(text: str) -> bool:
    """MergeLM's ``is_number``: ``float(text)`` or ``unicodedata.numeric(text)`` succeeds."""
    try:
        float(text)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(text)
        return True
    except (TypeError, ValueError):
        return False


def extract_answer_number(completion: str) -> int | None:
    """GSM8K answer as extracted in the paper (MergeLM / WizardMath ``extract_answer_number``).

    Split on ``"The answer is: "``; without it the answer is ``None``. After the last occurrence, the first
    match of ``[\\-+]?\\d*[\\.,/]?\\d+`` is taken (one separator only, so ``1,000,000`` -> ``1,000`` -> 1000).
    A fraction ``a/b`` gives ``round(a / b)`` (``round(a)`` when ``b == "0"``); anything else gives
    ``round(float(x))``. ``round`` is Python's banker's rounding (2.5 -> 2); infinity gives ``None``.

    Args:
        completion: the raw model completion.

    Returns:
        The predicted integer, or ``None`` when nothing could be extracted.
    """
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    match = _PAPER_NUMBER.search(parts[-1].strip())
    if match is None:
        return None
    text = match.group()
    if "/" in text:
        numerator, denominator = text.split("/")[0], text.split("/")[1]
        if not (_is_number(denominator) and _is_number(numerator)):
            return None
        if denominator == "0":
            return round(float(numerator.replace(",", "")))
        try:
            frac = Fraction(text.replace(",", ""))
        except ZeroDivisionError:  # "5/00": MergeLM would crash here; treat as no answer
            return None
        return round(float(frac.numerator / frac.denominator))
    value = float(text.replace(",", ""))
    if value == float("inf"):
        return None
    return round(value)


def _parse_flexible_number(text: str) -> float | None:
    """``"1,234.5"`` -> 1234.5, ``"3/4"`` -> 0.75; ``None`` for a zero denominator or a non-finite value."""
    text = text.replace(",", "")
    if "/" in text:
        numerator, denominator = text.split("/")
        if float(denominator) == 0:
            return None
        value = float(Fraction(numerator) / Fraction(denominator))
    else:
        value = float(text)
    return value if math.isfinite(value) else None


def extract_answer_number_flexible(completion: str) -> float | None:
    """GSM8K answer with a more forgiving extraction (not the paper's; reported as ``accuracy_flexible``).

    Differences from :func:`extract_answer_number`: the marker is matched case-insensitively with or without
    the colon/space ("The answer is 18", "The final answer is: 18"); numbers may carry any number of
    thousands separators (``1,000,000``); values are not rounded (``2.5`` stays ``2.5``); and when there is
    no marker, or no number after it, the last number in the whole completion is used.

    Args:
        completion: the raw model completion.

    Returns:
        The predicted value as a float, or ``None`` when the completion contains no number.
    """
    markers = list(_FLEX_MARKER.finditer(completion))
    if markers:
        match = _FLEX_NUMBER.search(completion[markers[-1].end():])
        if match is not None:
            return _parse_flexible_number(match.group())
    numbers = _FLEX_NUMBER.findall(completion)
    return _parse_flexible_number(numbers[-1]) if numbers else None


def gsm8k_gold_answer(answer: str) -> int:
    """Gold GSM8K answer: ``int(answer.split("#### ")[1].replace(",", ""))`` (MergeLM ``test_gsm8k``).

    Args:
        answer: the ``answer`` field of a GSM8K record (worked solution ending in ``#### N``).

    Returns:
        The integer answer.
    """
    parts = answer.split("#### ")
    if len(parts) < 2:
        raise ValueError(f"GSM8K answer must contain '#### N', got {answer[-80:]!r}; is this a GSM8K record?")
    return int(parts[1].replace(",", ""))


def last_boxed_only_string(string: str) -> str | None:
    """The last ``\\boxed{...}`` (else ``\\fbox{...}``) group in ``string``, braces balanced (Hendrycks).

    Args:
        string: a MATH solution or a completion.

    Returns:
        The substring from ``\\boxed`` to its closing brace, or ``None`` when there is none or it never closes.
    """
    idx = string.rfind("\\boxed")
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):
        if string[i] == "{":
            depth += 1
        elif string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx:i + 1]
    return None


def remove_boxed(string: str | None) -> str | None:
    """Inside of ``\\boxed{...}`` (Hendrycks ``remove_boxed``); ``None`` for ``\\fbox{}``, ``\\boxed 5`` or ``None``.

    Args:
        string: output of :func:`last_boxed_only_string`.

    Returns:
        The boxed content, or ``None`` when ``string`` is not of the form ``\\boxed{...}``.
    """
    left = "\\boxed{"
    if string is None or not string.startswith(left) or not string.endswith("}"):
        return None
    return string[len(left):-1]


def remove_boxed_flexible(string: str | None) -> str | None:
    """Like :func:`remove_boxed` but also accepts ``\\fbox{...}`` and ``\\boxed 5`` (flexible path only).

    Args:
        string: output of :func:`last_boxed_only_string`.

    Returns:
        The boxed content, or ``None``.
    """
    if string is None:
        return None
    for left in ("\\boxed{", "\\fbox{"):
        if string.startswith(left) and string.endswith("}"):
            return string[len(left):-1]
    if string.startswith("\\boxed "):
        return string[len("\\boxed "):].split("$")[0].strip() or None
    return None


def math_gold_answer(solution: str) -> str | None:
    """Gold MATH answer: ``remove_boxed(last_boxed_only_string(solution))`` (MergeLM / lm-eval)."""
    return remove_boxed(last_boxed_only_string(solution))


def math_gold_answer_flexible(solution: str) -> str | None:
    """Gold MATH answer that also reads ``\\fbox{}`` answers (flexible path only)."""
    return remove_boxed_flexible(last_boxed_only_string(solution))


def extract_math_answer(completion: str) -> str | None:
    """MATH answer as extracted in the paper (MergeLM ``process_results``).

    After the last ``"The answer is: "``: cut at the first ``".\\n"``, strip, drop one trailing ``.``, strip.

    Args:
        completion: the raw model completion.

    Returns:
        The answer string, or ``None`` when the marker is missing (counted wrong and logged as invalid).
    """
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()


def extract_math_answer_flexible(completion: str) -> str | None:
    """MATH answer with a fallback: the paper's marker first, else the last ``\\boxed{}``/``\\fbox{}``.

    Args:
        completion: the raw model completion.

    Returns:
        The answer string, or ``None``.
    """
    answer = extract_math_answer(completion)
    if answer is not None and answer:
        boxed = remove_boxed_flexible(last_boxed_only_string(answer))
        return boxed if boxed is not None else answer
    return remove_boxed_flexible(last_boxed_only_string(completion))
