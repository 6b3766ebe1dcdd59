"""The |delta| histogram: one bin per bfloat16 value, exact counts, and quantiles with a stated error bound.

A finite float32 ``|d|`` falls into bin ``bits(|d|) >> 16``: the bin holds every float32 whose top 16 bits (sign,
8 exponent bits, 7 mantissa bits) are the same, i.e. the values that truncate to one bfloat16 number. Bins are
log-spaced: ``[m 2^e, (m + 1) 2^e)`` for a 7-bit mantissa ``m`` in ``[128, 256)``, so each bin is at most
``2^-7`` of its lower edge wide (0.78 %). 32768 bins cover every float32 (bins from ``0x7F80`` up hold inf/NaN).

Quantile ``q`` is the order statistic of rank ``k = floor(q (n - 1))`` (0-based) of the ``n`` finite values,
``torch.quantile(..., interpolation="lower")``. It is estimated by the midpoint of the bin holding that rank
(clamped to the exact max), or exactly 0 when the rank falls among the exact zeros, which are counted apart.
Error bound: ``|estimate - exact| <= (hi - lo) / 2 <= 2^-8 * exact`` (0.39 %) for ``exact >= 2^-126``; for
subnormal values the absolute error is below ``2^-134``. The counts above thresholds and the max are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUM_BINS = 1 << 15
FIRST_NONFINITE_BIN = 0x7F80
QUANTILE_RELATIVE_ERROR = 2.0**-8
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)


def bin_edges(bins: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` float64 edges of the given bin indices: every float32 ``x`` of bin ``b`` has ``lo <= x < hi``."""
    bins = np.asarray(bins, dtype=np.uint32)
    lo = (bins << np.uint32(16)).view(np.float32).astype(np.float64)
    hi = ((bins + np.uint32(1)) << np.uint32(16)).view(np.float32).astype(np.float64)
    return lo, hi


def histogram_quantiles(histogram: np.ndarray, zeros: int, max_abs: float,
                        quantiles: Sequence[float] = QUANTILES) -> list[float | None]:
    """Quantiles of the finite values counted in ``histogram`` (see the module docstring for the bound).

    Args:
        histogram: (NUM_BINS,) int64 counts (non-finite bins are ignored).
        zeros: how many of the counted values are exactly 0 (they all lie in bin 0).
        max_abs: the exact largest finite value (clamps the top bin's midpoint).
        quantiles: levels in [0, 1].
    Returns:
        One float per level, or None for every level when there are no finite values.
    """
    finite = histogram[:FIRST_NONFINITE_BIN]
    cumulative = np.cumsum(finite)
    n = int(cumulative[-1]) if cumulative.size else 0
    if n == 0:
        return [None for _ in quantiles]
    out: list[float | None] = []
    for q in quantiles:
        if not 0 <= q <= 1:
            raise ValueError(f"quantile levels must be in [0, 1], got {q}")
        rank = int(np.floor(q * (n - 1)))
        if rank < zeros:
            out.append(0.0)
            continue
        b = int(np.searchsorted(cumulative, rank, side="right"))
        lo, hi = bin_edges(b)
        out.append(float(min((float(lo) + float(hi)) / 2, max_abs)))
    return out


def nonzero_bins(histogram: np.ndarray) -> list[list[float]]:
    """``[[lower edge, upper edge, count], ...]`` of the non-empty finite bins, for ``analysis.json`` and plots."""
    finite = histogram[:FIRST_NONFINITE_BIN]
    bins = np.flatnonzero(finite)
    lo, hi = bin_edges(bins)
    return [[float(a), float(b), int(c)] for a, b, c in zip(lo, hi, finite[bins], strict=True)]
