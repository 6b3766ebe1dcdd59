"""Process-wide settings of native libraries (OpenBLAS, glibc's allocator) for the streaming command lines.

Only scripts call these, once, at start; library code never changes process-wide settings. The measurements behind
each value are in benchmarks/README.md.
"""

from __future__ import annotations

import ctypes
import os

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def limit_blas_threads() -> None:
    """One OpenBLAS thread: the merge and the delta kernels call no BLAS, but OpenBLAS starts a thread per core
    that competes with the workers. Takes effect only before NumPy/SciPy are imported."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _mallopt(*settings: tuple[int, int]) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its defaults stay
        return
    for parameter, value in settings:
        libc.mallopt(parameter, value)


def tune_malloc_for_merging() -> None:
    """``merge_checkpoints.py``: reuse the 4 MiB row-chunk buffers from the heap, return bigger blocks at once.

    * mmap threshold fixed at 16 MiB: glibc's default rises after the first large free and caches blocks up to
      32 MiB per worker arena (higher peak RSS);
    * trim threshold 256 MiB, top pad 64 MiB: freed heap pages are kept for the next chunk instead of being
      re-faulted (peak RSS unchanged: the pages are reused, not accumulated).
    """
    _mallopt((_M_MMAP_THRESHOLD, 16 << 20), (_M_TRIM_THRESHOLD, 256 << 20), (_M_TOP_PAD, 64 << 20))


def tune_malloc_for_delta_analysis() -> None:
    """``analyze_deltas.py``: serve allocations of 1 MiB and more (the row blocks read from disk) by mmap, so freed
    blocks go back to the OS instead of staying in a fragmented heap (several times the peak RSS otherwise)."""
    _mallopt((_M_MMAP_THRESHOLD, 1 << 20))
