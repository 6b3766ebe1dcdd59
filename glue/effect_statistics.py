"""Uncertainty of a paired effect (DARE against no DARE, DARE against DropOnly): bootstrap intervals, signed-rank
tests and Holm's correction, written for the encoder tables.

The unit of resampling is the cluster that shares a result: a merge pair (its two target cells come from one merged
model, and each task is in several pairs) or a task of a drop-rate sweep. Within a cluster the replicates (the
fine-tuning seeds: one set of fine-tuned models gives every cell of the cluster that replicate) are resampled, and
within each replicate the seeds of the treated score (DARE seeds). Scores closer than ``TIE_TOLERANCE`` are equal:
the same merge recomputed differs by about 1e-14 from float rounding.
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
    """One compared cell: its cluster (pair or task), the reference score and the treated scores (one per seed).

    With several replicates (fine-tuning seeds) a cell is given once per replicate: same ``cluster`` and
    ``target`` (the cell within the cluster, e.g. the target task of a merge pair), its own ``replicate``. A cell
    without a ``target`` is its own cell."""

    cluster: str
    reference: float
    treated: tuple[float, ...]
    target: str | None = None
    replicate: int = 0

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


def cell_changes(cells: Sequence[PairedCell]) -> list[float]:
    """One change per cell: the mean over its replicates of (treated mean - reference), in first-seen order."""
    groups: dict[tuple, list[float]] = {}
    for i, c in enumerate(cells):
        key = (c.cluster, c.target) if c.target is not None else ("", i)
        groups.setdefault(key, []).append(c.change)
    return [float(np.mean(changes)) for changes in groups.values()]


def bootstrap_interval(cells: Sequence[PairedCell], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                       ) -> tuple[float, float]:
    """Percentile interval (``CONFIDENCE``) of the mean change: clusters resampled with replacement, within each
    drawn cluster its replicates (as many as it has, with replacement, shared by the cluster's cells), and within
    each cell its treated seeds (each cell of a drawn cluster counts as often as the cluster is drawn, averaged
    over the drawn replicates)."""
    rng = np.random.default_rng(seed)
    clusters = sorted({c.cluster for c in cells})
    index = {name: i for i, name in enumerate(clusters)}
    draws = rng.multinomial(len(clusters), [1 / len(clusters)] * len(clusters), size=resamples)  # (B, clusters)
    weights = np.stack([draws[:, index[c.cluster]] for c in cells], axis=1).astype(float)  # (B, cells)
    replicates = {name: sorted({c.replicate for c in cells if c.cluster == name}) for name in clusters}
    if any(len(r) > 1 for r in replicates.values()):  # one replicate everywhere: nothing to resample
        share = {}
        for name in clusters:
            reps = replicates[name]
            counts = rng.multinomial(len(reps), [1 / len(reps)] * len(reps), size=resamples)  # (B, replicates)
            share.update({(name, r): counts[:, k] / len(reps) for k, r in enumerate(reps)})
        weights *= np.stack([share[(c.cluster, c.replicate)] for c in cells], axis=1)
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
    """The effect over cells (a cell given for several replicates counts once, with its mean change)."""
    changes = cell_changes(cells)
    low, high = bootstrap_interval(cells, seed=seed)
    return Effect(len(changes), len({c.cluster for c in cells}), float(np.mean(changes)), low, high,
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
