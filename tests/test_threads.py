"""runmap._threads: a function over a few items at once, each outcome in order."""

from __future__ import annotations

import threading

import pytest

from runmap import _threads


def test_every_item_runs_at_once_and_outcomes_come_in_order() -> None:
    barrier = threading.Barrier(5)  # only passes if all five run at the same time

    def square(x: int) -> int:
        barrier.wait(timeout=10)
        if x == 3:
            raise KeyError(x)
        return x * x

    got = _threads.outcomes(square, range(5), "runmap-test")
    assert [g for i, g in enumerate(got) if i != 3] == [0, 1, 4, 16]
    assert isinstance(got[3], KeyError)


def test_each_raises_the_first_error_after_every_item_ran() -> None:
    ran: list[int] = []

    def check(x: int) -> int:
        ran.append(x)
        if x % 2:
            raise ValueError(f"odd {x}")
        return x

    with pytest.raises(ValueError, match="odd 1"):
        _threads.each(check, range(6), "runmap-test", max_threads=2)
    assert sorted(ran) == list(range(6))
    assert _threads.each(check, [0, 2, 4], "runmap-test") == [0, 2, 4]


def test_one_item_runs_in_the_calling_thread() -> None:
    assert _threads.each(lambda _: threading.current_thread().name, ["x"], "runmap-test") == ["MainThread"]
    assert _threads.each(lambda x: x, [], "runmap-test") == []
