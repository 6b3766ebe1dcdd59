"""The one pass over the elements: every statistic of ``delta = float32(finetuned) - float32(base)`` at once.

For each element and each fine-tuned model the kernel computes the delta once and updates, in the same loop:
the |delta| histogram (``delta_analysis.histogram``), the count of exact zeros and of non-finite deltas, the
exact counts above the thresholds, the exact max, the float64 sums ``sum d^2``, ``sum f^2``, ``sum f b``,
``sum b^2``, and for every pair of fine-tuned models ``sum d_i d_j`` and the sign-conflict counts. One compiled
pass instead of about fifteen torch calls per chunk, without the interpreter lock, so worker threads run it side
by side. The delta is rounded to float32 exactly as ``finetuned.float() - base.float()`` is in torch (one float32
subtraction of exact float32 inputs), so the tests compare against torch on the same values.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from delta_analysis.unit_statistics import (
    ABOVE,
    DOT_FINETUNED_BASE,
    MAX_ABS,
    NONFINITE,
    PAIR_BOTH_NONZERO,
    PAIR_CONFLICTS,
    PAIR_DOT,
    SQ_BASE,
    SQ_DELTA,
    SQ_FINETUNED,
    ZEROS,
)
from model_merging_methods.dare_kernels import njit

_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


def _as_float32(x):  # pragma: no cover - replaced by the overload below inside compiled code
    raise NotImplementedError


@overload(_as_float32, inline="always")
def _as_float32_overload(x):
    if x == types.uint16:  # bfloat16 given as its 16 bits: exactly float32's top half
        return lambda x: np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
    return lambda x: np.float32(x)


@njit(nogil=True, cache=True)
def _one_model(base, finetuned, t0, t1, t2, t3, histogram, counts, sums, out):
    """Statistics of one fine-tuned model's deltas; writes the deltas (non-finite ones as 0) into ``out``."""
    zeros = nonfinite = c0 = c1 = c2 = c3 = 0
    sq_delta = sq_finetuned = dot = sq_base = 0.0
    max_abs = np.float32(0)
    for i in range(base.size):
        b = _as_float32(base[i])
        f = _as_float32(finetuned[i])
        x = np.float32(f - b)
        a = np.float32(abs(x))
        histogram[np.float32(a).view(np.uint32) >> np.uint32(16)] += 1
        if not a <= _FLOAT32_MAX:
            nonfinite += 1
            out[i] = 0  # left out of every sum and of the sign comparisons
            continue
        out[i] = x
        zeros += a == 0
        c0 += a > t0
        c1 += a > t1
        c2 += a > t2
        c3 += a > t3
        max_abs = max(max_abs, a)
        b64, f64, x64 = np.float64(b), np.float64(f), np.float64(x)
        sq_delta += x64 * x64
        sq_finetuned += f64 * f64
        dot += f64 * b64
        sq_base += b64 * b64
    counts[ZEROS] += zeros
    counts[NONFINITE] += nonfinite
    counts[ABOVE] += c0
    counts[ABOVE + 1] += c1
    counts[ABOVE + 2] += c2
    counts[ABOVE + 3] += c3
    sums[SQ_DELTA] += sq_delta
    sums[SQ_FINETUNED] += sq_finetuned
    sums[DOT_FINETUNED_BASE] += dot
    sums[SQ_BASE] += sq_base
    sums[MAX_ABS] = max(sums[MAX_ABS], max_abs)
    return 0


@njit(nogil=True, cache=True)
def _one_pair(x, y, pair):
    dot = 0.0
    conflicts = both = 0
    for i in range(x.size):
        dot += np.float64(x[i]) * np.float64(y[i])
        nonzero = (x[i] != 0) & (y[i] != 0)
        both += nonzero
        conflicts += nonzero & ((x[i] > 0) != (y[i] > 0))
    pair[PAIR_DOT] += dot
    pair[PAIR_CONFLICTS] += conflicts
    pair[PAIR_BOTH_NONZERO] += both
    return 0


BLOCK = 1 << 14  # elements per model whose deltas are kept for the pairwise sums (64 KiB each: stays in cache)


@njit(nogil=True, cache=True)
def delta_statistics(base, finetuned, thresholds, histogram, counts, sums, pairs):
    """Accumulate the statistics of ``finetuned[j] - base`` into the output arrays (added to, not reset).

    Args:
        base: (n,) float32 values, or uint16 bfloat16 bits.
        finetuned: (m, n) of the same dtype as ``base``.
        thresholds: (4,) float32; ``counts[j, ABOVE + k]`` counts ``|d| > thresholds[k]``.
        histogram: (m, NUM_BINS) int64; bin of ``|d|`` = its float32 bits >> 16.
        counts: (m, ABOVE + 4) int64.
        sums: (m, NUM_SUMS) float64 (``MAX_ABS`` holds a running max).
        pairs: (m, m, NUM_PAIR_SUMS) float64, upper triangle used (sign conflicts: both nonzero, opposite signs).
    """
    m, n = finetuned.shape
    deltas = np.empty((m, min(n, BLOCK)), dtype=np.float32)
    t0, t1, t2, t3 = thresholds[0], thresholds[1], thresholds[2], thresholds[3]
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        for j in range(m):
            _one_model(base[start:stop], finetuned[j, start:stop], t0, t1, t2, t3, histogram[j], counts[j], sums[j],
                       deltas[j, :stop - start])
        for j in range(m):
            for k in range(j + 1, m):
                _one_pair(deltas[j, :stop - start], deltas[k, :stop - start], pairs[j, k])
    return 0
