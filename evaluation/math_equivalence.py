"""MATH answer normalisation and equivalence, exactly as MergeLM scores MATH (Hendrycks et al., 2021).

A port of ``strip_string`` / ``is_equiv`` from yule-BUAA/MergeLM ``utils/evaluate_llms_utils.py`` (commit
0dbd199), which copied hendrycks/math ``modeling/math_equivalence.py`` with two changes that MergeLM's
numbers depend on and that are kept here: its ``fix_a_slash_b`` catches only ``AssertionError``, and a bare
``%`` is not removed (only ``\\%``). :func:`is_equiv` returns what MergeLM's ``is_equiv`` returns on every
input; ``tests/test_math_equivalence.py`` checks that against a verbatim copy of the original functions.

* Both ``None`` -> ``True`` (with a warning); exactly one ``None`` -> ``False``.
* Otherwise both strings are normalised with :func:`strip_string` and compared; if normalising either one
  raises, the raw strings are compared instead (MergeLM's ``except Exception``). Normalising raises

  - ``ValueError`` for a normalised string with exactly one ``/`` and a side that ``int()`` rejects
    (``\\pi/2``, ``0.5/2``, ``x/2``, ``1/``; also an integer of more than 4300 digits), because
    ``int()`` fails outside the original's ``try ... except AssertionError``. So ``\\pi / 2`` and
    ``\\pi/2`` are *not* equivalent;
  - ``IndexError`` where ``\\sqrt`` or ``\\frac`` has nothing after it (a string ending in one of them);
  - an ``AssertionError`` (:class:`_NormalisationError`) for two or more ``"\\text{ "`` unit markers.

There is no lenient variant: the earlier one (which treated a failed ``int()`` as "leave the string
unchanged" and went on normalising) had no caller and is gone.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class _NormalisationError(AssertionError):
    """Raised where the original fails an ``assert``; :func:`is_equiv` then compares the raw strings."""


def _fix_fracs(string: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``; a too-short tail returns the input."""
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        # substr[0] raises IndexError on a trailing "\frac", as in Hendrycks (-> raw comparison)
        if substr[0] == "{":
            new_str += substr
            continue
        if len(substr) < 2:
            return string
        a, b = substr[0], substr[1]
        if b != "{":
            new_str += "{" + a + "}{" + b + "}" + substr[2:]
        else:
            new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    """Exactly ``int/int`` becomes ``\\frac{int}{int}``; other spellings of integers (``+1/2``) are kept.

    Raises:
        ValueError: where a side of the single ``/`` is not an integer; the original only catches the
            ``AssertionError`` of its round-trip check, so this makes :func:`is_equiv` compare the raw strings.
    """
    parts = string.split("/")
    if len(parts) != 2:
        return string
    a, b = int(parts[0]), int(parts[1])  # ValueError propagates, as in MergeLM
    if string != f"{a}/{b}":
        return string
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(string: str) -> str:
    """Drop ``"\\text{ ..."`` units; more than one occurrence is an error (Hendrycks ``assert``)."""
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        if len(splits) != 2:
            raise _NormalisationError(f"expected one '\\text{{ ' unit marker, got {len(splits) - 1}")
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (single character only)."""
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        # split[0] raises IndexError on a trailing "\sqrt", as in Hendrycks (-> raw comparison)
        if split[0] != "{":
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_string += "\\sqrt" + split
    return new_string


def strip_string(string: str) -> str:
    """Normalise a MATH answer string (Hendrycks ``_strip_string``, same steps in the same order).

    Steps: drop newlines and ``\\!``; ``\\\\`` -> ``\\``; ``tfrac``/``dfrac`` -> ``frac``; drop ``\\left``,
    ``\\right``, degree marks and ``\\$``; drop right units; drop ``\\%``; ``" ."`` -> ``" 0."`` and
    ``"{."`` -> ``"{0."``; a leading ``.`` gets a ``0``; ``"k = v"`` with a left side of at most two characters
    becomes ``v``; fix ``\\sqrt``; remove spaces; fix ``\\frac``; ``0.5`` -> ``\\frac{1}{2}``; ``a/b`` -> frac.

    Args:
        string: an answer as written by a model or inside ``\\boxed{}``.

    Returns:
        The normalised string.

    Raises:
        ValueError, IndexError, _NormalisationError: where the original code fails (see the module docstring);
            :func:`is_equiv` catches them and compares the raw strings.
    """
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def is_equiv(str1: str | None, str2: str | None) -> bool:
    """MergeLM's ``is_equiv``: compare two MATH answers after :func:`strip_string`.

    Both ``None`` -> ``True`` (with a warning, as the original prints one); exactly one ``None`` -> ``False``;
    if normalising either string fails, the raw strings are compared instead.

    Args:
        str1: the predicted answer (or ``None``).
        str2: the reference answer (or ``None``).

    Returns:
        Whether the two answers are considered equal.
    """
    if str1 is None and str2 is None:
        logger.warning("is_equiv: both answers are None")
        return True
    if str1 is None or str2 is None:
        return False
    try:
        return strip_string(str1) == strip_string(str2)
    except Exception:  # as MergeLM: any failure -> raw comparison
        return str1 == str2
