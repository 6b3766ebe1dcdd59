"""Bounded, ordered concurrency: run ``fn`` over items in a thread pool, yield results in input order.

At most ``depth`` items are in flight, which bounds memory to ``depth`` units' tensors while reads (``preadv``),
DARE mask draws (NumPy) and torch kernels, all of which release the GIL, overlap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], executor: Executor, depth: int) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` in order with at most ``depth`` calls pending; errors surface in order."""
    pending: deque[tuple[T, Future]] = deque()
    try:
        for item in items:
            pending.append((item, executor.submit(fn, item)))
            if len(pending) >= depth:
                head, future = pending.popleft()
                yield head, future.result()
        while pending:
            head, future = pending.popleft()
            yield head, future.result()
    finally:
        for _, future in pending:
            future.cancel()
