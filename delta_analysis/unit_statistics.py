"""The statistics of one row block, laid out in arrays: the compiled kernel or the same in torch operations.

``kernel.py`` (Numba, one pass, imported by ``analysis.py`` on first use: loading Numba and the cached kernel
takes 0.5-1 s; it imports this module's array layout, never the other way round) serves the full analysis;
``delta_statistics_torch`` computes the same arrays with torch operations and serves the homology preflight, which
reads about a megabyte and must not pay for loading Numba. Integer outputs (histogram, counts) and the max are
identical; the float64 sums agree to rounding (tested).
"""

from __future__ import annotations

import numpy as np
import torch

# counts[j, :] layout: exact zeros, non-finite deltas, then one count per threshold (|d| > t)
ZEROS, NONFINITE, ABOVE = 0, 1, 2
# sums[j, :] layout (float64; MAX_ABS holds a running max)
SQ_DELTA, SQ_FINETUNED, DOT_FINETUNED_BASE, SQ_BASE, MAX_ABS = 0, 1, 2, 3, 4
NUM_SUMS = 5
# pairs[j, k, :] layout (j < k)
PAIR_DOT, PAIR_CONFLICTS, PAIR_BOTH_NONZERO = 0, 1, 2
NUM_PAIR_SUMS = 3
NUM_BINS = 1 << 15
FLOAT32_MAX = float(np.finfo(np.float32).max)


def delta_statistics_torch(base: np.ndarray, finetuned: np.ndarray, thresholds: np.ndarray, histogram: np.ndarray,
                           counts: np.ndarray, sums: np.ndarray, pairs: np.ndarray) -> None:
    """``kernel.delta_statistics`` with torch operations (same arguments, same accumulation into the arrays)."""
    b = _values(base)
    f = _values(finetuned)
    d = f - b
    a = d.abs()
    finite = a <= FLOAT32_MAX
    bins = (a.view(torch.int32) >> 16).numpy()
    for j in range(d.shape[0]):
        histogram[j] += np.bincount(bins[j], minlength=NUM_BINS)
    d = torch.where(finite, d, 0.0)
    counts[:, ZEROS] += (a == 0).sum(1).numpy()
    counts[:, NONFINITE] += (~finite).sum(1).numpy()
    for k, t in enumerate(thresholds):
        counts[:, ABOVE + k] += ((a > float(t)) & finite).sum(1).numpy()
    sums[:, MAX_ABS] = np.maximum(sums[:, MAX_ABS], torch.where(finite, a, 0.0).amax(1).double().numpy()
                                  if a.shape[1] else 0.0)
    d64 = d.double()
    f64, b64 = torch.where(finite, f, 0.0).double(), torch.where(finite, b, 0.0).double()
    sums[:, SQ_DELTA] += (d64 * d64).sum(1).numpy()
    sums[:, SQ_FINETUNED] += (f64 * f64).sum(1).numpy()
    sums[:, DOT_FINETUNED_BASE] += (f64 * b64).sum(1).numpy()
    sums[:, SQ_BASE] += (b64 * b64).sum(1).numpy()
    for j in range(d.shape[0]):
        for k in range(j + 1, d.shape[0]):
            both = (d[j] != 0) & (d[k] != 0)
            pairs[j, k, PAIR_DOT] += float((d64[j] * d64[k]).sum())
            pairs[j, k, PAIR_CONFLICTS] += int((both & ((d[j] > 0) != (d[k] > 0))).sum())
            pairs[j, k, PAIR_BOTH_NONZERO] += int(both.sum())


def _values(array: np.ndarray) -> torch.Tensor:
    """float32 values of a float32 array or of uint16 bfloat16 bits."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if array.dtype == np.uint16:
        return tensor.view(torch.bfloat16).float()
    return tensor.float()
