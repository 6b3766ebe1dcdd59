"""The paper's LLM selection split: a seeded 10 % validation sample of each benchmark, the other 90 % for testing.

The first author (MergeLM issue 44): "We sample 10% of the data from each benchmark to construct the validation
set used for grid search". The sample is not published, so this one is defined here and kept stable: every
example position gets the key ``sha256("{seed}/{dataset}/{position}")`` and the ``round(fraction * n)`` positions
with the smallest keys (at least one) form the validation part. The keys depend on nothing but these three values
(no library random generator whose stream could change between versions), so the same seed always gives the same
split, on any machine, and a larger ``n`` keeps the ranking of the positions it shares with a smaller one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DEFAULT_VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class ValidationSplit:
    """Positions (0-based, into the evaluated slice of a test set) of the two disjoint parts, each sorted."""

    validation: tuple[int, ...]
    test: tuple[int, ...]


def _key(seed: int, dataset_name: str, position: int) -> bytes:
    return hashlib.sha256(f"{seed}/{dataset_name}/{position}".encode()).digest()


def check_validation_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}; the paper's is 0.1")


def split_positions(
    num_examples: int, *, dataset_name: str, fraction: float = DEFAULT_VALIDATION_FRACTION, seed: int = 0
) -> ValidationSplit:
    """Split ``range(num_examples)`` into a validation sample and the rest.

    Args:
        num_examples: size of the evaluated set (at least 2, so that both parts are non-empty).
        dataset_name: mixed into the keys, so each benchmark gets its own sample.
        fraction: share of the validation part, in (0, 1); 0.1 in the paper.
        seed: split seed; the same seed gives the same split.
    Returns:
        The disjoint validation and test positions; together they cover ``range(num_examples)``.
    """
    check_validation_fraction(fraction)
    if num_examples < 2:
        raise ValueError(f"{dataset_name}: a validation/test split needs at least 2 examples, got {num_examples}; "
                         "raise --end_index")
    size = min(num_examples - 1, max(1, round(fraction * num_examples)))
    ranked = sorted(range(num_examples), key=lambda position: _key(seed, dataset_name, position))
    return ValidationSplit(tuple(sorted(ranked[:size])), tuple(sorted(ranked[size:])))
