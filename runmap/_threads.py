"""Runs a function over a few items at once, a thread for each (up to a limit), and waits for them all.

Closing goes through here (a cluster's servlets, a Mapper's replicas, an SSH
cluster's connections), and so does what a close may follow: not through
``concurrent.futures``. A ``ThreadPoolExecutor`` refuses work once the
interpreter has begun to exit, before the ``atexit`` hooks that close what a
script left open run: a Mapper of two replicas left open failed to close at
exit ("cannot schedule new futures after interpreter shutdown"), its replicas
ending only as the client's pipes closed.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_THREADS = 16


def outcomes(
    fn: Callable[[T], R], items: Iterable[T], name: str, max_threads: int = MAX_THREADS
) -> list[R | BaseException]:
    """``fn(item)`` for every item, in threads named ``name_<i>``: each result, or the exception it raised, in order.

    One item runs in the calling thread.
    """
    todo = list(items)
    results: list[R | BaseException] = [None] * len(todo)  # type: ignore[list-item]
    taken = itertools.count()  # next() on a count is atomic: each item is taken once

    def work() -> None:
        while (i := next(taken)) < len(todo):
            try:
                results[i] = fn(todo[i])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which decides
                results[i] = exc

    if len(todo) <= 1:
        work()
        return results
    threads = [
        threading.Thread(target=work, name=f"{name}_{k}", daemon=True) for k in range(min(max_threads, len(todo)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def first_error(results: Iterable[object]) -> BaseException | None:
    """The first exception among :func:`outcomes`' results, if any."""
    return next((r for r in results if isinstance(r, BaseException)), None)


def each(fn: Callable[[T], R], items: Iterable[T], name: str, max_threads: int = MAX_THREADS) -> list[R]:
    """:func:`outcomes`, raising the first exception once every item has run."""
    results = outcomes(fn, items, name, max_threads)
    error = first_error(results)
    if error is not None:
        raise error
    return results  # type: ignore[return-value]
