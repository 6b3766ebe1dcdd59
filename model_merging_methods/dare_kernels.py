"""DARE's element step on the CPU, compiled: ``x * keep / (1 - p)`` fused with the subtraction of the base.

One pass over memory per fine-tuned element instead of one per NumPy/torch call (upcast, subtract, mask,
rescale), and without the interpreter lock, so parallel workers run it side by side. ``dare.py`` draws the
random bytes and calls these kernels; tensors on other devices use ``dare.drop_and_rescale`` (same values,
tested on CUDA).

Both DARE kernels compute ``_element(d, keep, q, rescale)`` for ``d = float32(finetuned) - base`` with a
bfloat16 ``finetuned`` (or for the float32 value in place), with ``keep = top_byte > threshold_top`` in a
branch-free loop, and then rewrite the few elements whose top byte equals the threshold's and whose low bits say
"keep" (``fix_positions``, drawn by ``dare.py``).
Each operation rounds as NumPy's float32 operations do (a float64 intermediate rounded to float32 gives the
same value for one subtraction, product or quotient), so the results are bit-identical to the plain formula.
The kernels are compiled on first use and cached next to this file (or in Numba's user cache directory).
"""

from __future__ import annotations

import numpy as np
from numba import njit as _njit


def njit(**options):
    """``numba.njit`` with the on-disk cache where a cache folder is writable, without it otherwise."""
    def decorate(function):
        try:
            return _njit(**options)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available" (read-only install, no HOME)
            return _njit(**{**options, "cache": False})(function)
    return decorate


@njit(nogil=True, cache=True, inline="always")
def _element(d, keep, q, rescale):
    """DARE of one float32 value: ``d * keep / q`` (``q = float32(1 - p)``), or ``d * keep`` for DropOnly."""
    d = np.float32(d * np.float32(keep))
    if rescale:
        d = np.float32(d / q)
    return d


@njit(nogil=True, cache=True, inline="always")
def _bf16_value(bits):
    """The float32 value of a bfloat16 given as its 16 bits (exact: bfloat16 is float32's top half)."""
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


_LOW_BITS = np.uint64(0x0101010101010101)
_HIGH_BITS = np.uint64(0x8080808080808080)


@njit(nogil=True, cache=True)
def equal_byte_positions(words, byte, count):
    """Ascending positions ``i < count`` of the bytes equal to ``byte`` in ``words`` (uint64, read little-endian).

    Scans 8 bytes at a time: ``v = word ^ (byte * 0x0101...)`` has a zero byte exactly where ``word`` has
    ``byte``, and ``(v - 0x0101...) & ~v & 0x8080...`` is nonzero exactly when ``v`` has a zero byte.
    """
    pattern = np.uint64(byte) * _LOW_BITS
    positions = np.empty(count, dtype=np.int64)
    n = 0
    for w in range(words.size):
        v = words[w] ^ pattern
        if (v - _LOW_BITS) & ~v & _HIGH_BITS:
            for b in range(8):
                i = w * 8 + b
                if (v >> np.uint64(8 * b)) & np.uint64(0xFF) == 0 and i < count:
                    positions[n] = i
                    n += 1
    return positions[:n]


@njit(nogil=True, cache=True)
def dare_in_place(x, top, threshold_top, fix_positions, q, rescale):
    """``x[i] = DARE(x[i])`` for a float32 array."""
    kept = np.empty(fix_positions.size, dtype=np.float32)  # the values the main loop overwrites
    for j in range(fix_positions.size):
        kept[j] = x[fix_positions[j]]
    for i in range(x.size):
        x[i] = _element(x[i], top[i] > threshold_top, q, rescale)
    for j in range(fix_positions.size):
        x[fix_positions[j]] = _element(kept[j], True, q, rescale)
    return 0


@njit(nogil=True, cache=True)
def dare_subtract_bf16(out, finetuned_bits, base, top, threshold_top, fix_positions, q, rescale):
    """``out[i] = DARE(float32(finetuned[i]) - base[i])`` for a bfloat16 ``finetuned`` given as uint16 bits."""
    for i in range(out.size):
        out[i] = _element(np.float32(_bf16_value(finetuned_bits[i]) - base[i]), top[i] > threshold_top, q, rescale)
    for j in range(fix_positions.size):
        i = fix_positions[j]
        out[i] = _element(np.float32(_bf16_value(finetuned_bits[i]) - base[i]), True, q, rescale)
    return 0
