"""Accumulated delta statistics of one scope (a tensor, a layer, a whole model) and their readable summaries.

Definitions (``d = finetuned - base`` per element, in float32; sums in float64):

* relative change ``||d|| / ||base||`` (L2 norms over the scope); None when the base is all zeros;
* weight cosine ``<finetuned, base> / (||finetuned|| ||base||)``: near 1 for a fine-tune, near 0 for
  independently initialised weights;
* task-vector cosine of models i, j: ``<d_i, d_j> / (||d_i|| ||d_j||)``;
* sign conflict of models i, j: a coordinate where both deltas are nonzero and their signs are opposite.
  ``sign_conflict_fraction`` divides by every coordinate analysed, ``sign_conflict_fraction_of_both_nonzero``
  by the coordinates where both deltas are nonzero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from delta_analysis import unit_statistics as kernel
from delta_analysis.histogram import NUM_BINS, QUANTILES, histogram_quantiles

# |delta| thresholds: the paper's SFT range (0.002; 0.005 in its first version), "often above 0.01" for
# WizardCoder-Python against Llama-2, "around 0.03" after continued pre-training (arXiv:2311.03099, section 4.4).
THRESHOLDS: tuple[float, ...] = (0.002, 0.005, 0.01, 0.03)


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator > 0 else None


def _exact_sum(parts: list[np.ndarray]) -> np.ndarray:
    """Element-wise ``math.fsum`` over equally shaped arrays: the correctly rounded sum, whatever their order."""
    stacked = np.stack(parts).reshape(len(parts), -1)
    return np.array([math.fsum(column) for column in stacked.T]).reshape(parts[0].shape)


@dataclass
class Sums:
    """Raw accumulators of ``m`` fine-tuned models over one scope (arrays laid out as ``kernel`` writes them).

    A unit's ``Sums`` is filled by the kernel; scopes collect units with ``add``. Integer counts, histograms and
    maxima add exactly; the float64 sums of every unit are kept and added with ``math.fsum`` when read, so a
    scope's figures do not depend on the order its units were visited in (a checkpoint's storage order or a
    state dict's order).
    """

    num_models: int
    numel: int = 0
    histogram: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)
    sums: np.ndarray = field(init=False)
    pairs: np.ndarray = field(init=False)
    parts: list[tuple[np.ndarray, np.ndarray]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        m = self.num_models
        self.histogram = np.zeros((m, NUM_BINS), dtype=np.int64)
        self.counts = np.zeros((m, kernel.ABOVE + len(THRESHOLDS)), dtype=np.int64)
        self.sums = np.zeros((m, kernel.NUM_SUMS), dtype=np.float64)
        self.pairs = np.zeros((m, m, kernel.NUM_PAIR_SUMS), dtype=np.float64)

    def _parts(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.parts or [(self.sums[:, :kernel.MAX_ABS], self.pairs)]

    def add(self, other: Sums) -> None:
        self.parts = [*self._parts(), *other._parts()] if self.numel else list(other._parts())
        self.numel += other.numel
        self.histogram += other.histogram
        self.counts += other.counts
        self.sums[:, kernel.MAX_ABS] = np.maximum(self.sums[:, kernel.MAX_ABS], other.sums[:, kernel.MAX_ABS])

    def float_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact totals ``(sums[:, :MAX_ABS], pairs)``."""
        parts = self._parts()
        return _exact_sum([p[0] for p in parts]), _exact_sum([p[1] for p in parts])


def model_summary(sums: Sums, j: int) -> dict:
    """The readable statistics of model ``j`` over the scope of ``sums`` (full-precision floats)."""
    counts, s, n = sums.counts[j], sums.float_sums()[0][j], sums.numel
    zeros, max_abs = int(counts[kernel.ZEROS]), float(sums.sums[j, kernel.MAX_ABS])
    quantiles = histogram_quantiles(sums.histogram[j], zeros, max_abs)
    above = {str(t): int(counts[kernel.ABOVE + i]) for i, t in enumerate(THRESHOLDS)}
    delta_norm, base_norm = math.sqrt(s[kernel.SQ_DELTA]), math.sqrt(s[kernel.SQ_BASE])
    finetuned_norm = math.sqrt(s[kernel.SQ_FINETUNED])
    return {
        "numel": n,
        "max_abs": max_abs,
        "quantiles_abs": {f"{100 * q:g}": v for q, v in zip(QUANTILES, quantiles, strict=True)},
        "count_above": above,
        "fraction_above": {t: _ratio(c, n) for t, c in above.items()},
        "fraction_zero": _ratio(zeros, n),
        "nonfinite": int(counts[kernel.NONFINITE]),
        "delta_norm": delta_norm,
        "base_norm": base_norm,
        "relative_change": _ratio(delta_norm, base_norm),
        "weight_cosine": _ratio(s[kernel.DOT_FINETUNED_BASE], finetuned_norm * base_norm),
    }


def pair_summary(sums: Sums, i: int, j: int) -> dict:
    """Task-vector cosine and sign conflicts of models ``i < j`` over the scope of ``sums``."""
    totals, pairs = sums.float_sums()
    dot, conflicts, both = pairs[i, j]
    norms = math.sqrt(totals[i, kernel.SQ_DELTA]) * math.sqrt(totals[j, kernel.SQ_DELTA])
    return {
        "numel": sums.numel,
        "cosine": _ratio(dot, norms),
        "sign_conflicts": int(conflicts),
        "both_nonzero": int(both),
        "sign_conflict_fraction": _ratio(conflicts, sums.numel),
        "sign_conflict_fraction_of_both_nonzero": _ratio(conflicts, both),
    }
