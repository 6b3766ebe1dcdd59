"""Selection of the best candidate of a grid: one rule for every pipeline (GLUE pairs, LLM grid points)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar

K = TypeVar("K")


def select_best(candidates: Iterable[tuple[K, float | None]]) -> tuple[K, float] | None:
    """The first candidate with the highest score, as ``(candidate, score)``.

    Only a strictly greater score replaces the current best, so ties go to the earlier candidate. A missing
    (``None``) or NaN score never wins: a NaN would otherwise beat nothing and be beaten by nothing, and which
    candidate won would depend on the order. ``None`` when no candidate has a finite-or-infinite number.
    """
    best: tuple[K, float] | None = None
    for candidate, score in candidates:
        if score is None or math.isnan(score):
            continue
        if best is None or score > best[1]:
            best = (candidate, float(score))
    return best
