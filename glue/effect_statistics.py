"""Uncertainty of a paired effect (DARE against no DARE, DARE against DropOnly): bootstrap intervals, signed-rank
tests and Holm's correction, written for the encoder tables.

The unit of resampling is the cluster that shares a result: a merge pair (its two target cells come from one merged
model, and each task is in several pairs) or a task of a drop-rate sweep; within a cluster the seeds of the
treated score (DARE seeds) are resampled too. Scores closer than ``TIE_TOLERANCE`` are equal: the same merge
recomputed differs by about 1e-14 from float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: two scores (x100) closer than this are the same result
TIE_TOLERANCE = 1e-9
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedCell:
    """One compared cell: its cluster (pair or task), the reference score and the treated scores (one per seed)."""

    cluster: str
    reference: float
    treated: tuple[float, ...]

    @property
    def change(self) -> float:
        return float(np.mean(self.treated)) - self.reference


@dataclass(frozen=True)
class Effect:
    """The mean change over cells, its bootstrap interval, counts beyond the tolerance and the signed-rank test."""

    cells: int
    clusters: int
    mean: float
    low: float
    high: float
    higher: int
    lower: int
    p_value: float | None


def bootstrap_interval(cells: Sequence[PairedCell], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                       ) -> tuple[float, float]:
    """Percentile interval (``CONFIDENCE``) of the mean change: clusters resampled with replacement, and within
    each cell its treated seeds (each cell of a drawn cluster counts as often as the cluster is drawn)."""
    rng = np.random.default_rng(seed)
    clusters = sorted({c.cluster for c in cells})
    index = {name: i for i, name in enumerate(clusters)}
    draws = rng.multinomial(len(clusters), [1 / len(clusters)] * len(clusters), size=resamples)  # (B, clusters)
    weights = np.stack([draws[:, index[c.cluster]] for c in cells], axis=1).astype(float)  # (B, cells)
    changes = np.empty((resamples, len(cells)))
    for j, c in enumerate(cells):
        treated = np.asarray(c.treated, dtype=float)
        picks = rng.integers(len(treated), size=(resamples, len(treated)))
        changes[:, j] = treated[picks].mean(axis=1) - c.reference
    means = (weights * changes).sum(axis=1) / weights.sum(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def signed_rank_p(changes: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of the changes beyond ``TIE_TOLERANCE`` (exact for small samples);
    None with no such change. The cells of one cluster are not independent: read it as descriptive."""
    from scipy.stats import wilcoxon

    nonzero = [c for c in changes if abs(c) > TIE_TOLERANCE]
    if not nonzero:
        return None
    return float(wilcoxon(nonzero, alternative="two-sided").pvalue)


def paired_effect(cells: Sequence[PairedCell], *, seed: int = 0) -> Effect:
    changes = [c.change for c in cells]
    low, high = bootstrap_interval(cells, seed=seed)
    return Effect(len(cells), len({c.cluster for c in cells}), float(np.mean(changes)), low, high,
                  sum(c > TIE_TOLERANCE for c in changes), sum(c < -TIE_TOLERANCE for c in changes),
                  signed_rank_p(changes))


def holm(p_values: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjustment over the given tests (None stays None and is not counted)."""
    tested = sorted(((p, name) for name, p in p_values.items() if p is not None and not math.isnan(p)))
    adjusted: dict[str, float | None] = dict.fromkeys(p_values)
    running = 0.0
    for rank, (p, name) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[name] = running
    return adjusted
