"""MATH answer normalisation and equivalence (Hendrycks et al., 2021, arXiv:2103.03874).

A faithful port of ``math_equivalence.py`` from hendrycks/math, as copied into WizardMath and MergeLM
(``utils/evaluate_llms_utils.py``). The quirks are kept on purpose because the paper's MATH numbers depend
on them:

* ``_remove_right_units`` requires exactly one ``"\\text{ "``; with two or more the normalisation fails and
  :func:`is_equiv` falls back to a raw string comparison.
* any other exception raised while normalising (for example a string ending in ``\\sqrt``) also falls back
  to the raw comparison.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class _NormalisationError(Exception):
    """Raised where Hendrycks' code fails an ``assert``; :func:`is_equiv` then compares the raw strings."""


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
    """A string that is exactly ``int/int`` becomes ``\\frac{int}{int}``; anything else is returned unchanged."""
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return string
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
        _NormalisationError, IndexError: where the original code fails; :func:`is_equiv` catches them.
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
    """Hendrycks' ``is_equiv``: compare two MATH answers after :func:`strip_string`.

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
    except Exception:  # Hendrycks uses a bare except: any failure -> raw comparison
        return str1 == str2
