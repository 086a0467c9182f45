"""mapper.amap / mapper.aimap: maps for asyncio code, on real local replicas."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import runmap as rm


class Unlucky(Exception):
    pass


def slow_square(x: float) -> float:
    if x == 13:
        raise Unlucky("13 is unlucky")
    time.sleep(x if x < 1 else 0)
    return x * x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.fixture(scope="module")
def mapper() -> Iterator[rm.Mapper]:
    with rm.mapper(slow_square, num_replicas=2) as m:
        yield m


def _aio_threads(grace: float = 2.0) -> list[str]:
    """The aio worker threads still alive after ``grace`` seconds.

    A worker tells the event loop it exited just before its thread returns, so
    the thread may outlive ``asyncio.run`` by a moment (longer on a loaded
    machine, or once a large library such as Ray is imported).
    """
    deadline = time.monotonic() + grace
    while True:
        names = [t.name for t in threading.enumerate() if t.name.startswith("runmap-aio")]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.01)


def test_amap_returns_results_in_input_order(mapper: rm.Mapper) -> None:
    assert asyncio.run(mapper.amap([3, 1, 2, 0], progress=False)) == [9, 1, 4, 0]
    assert asyncio.run(mapper.amap(range(20, 120), progress=False, chunksize=10)) == [x * x for x in range(20, 120)]


def test_aimap_streams_without_blocking_the_event_loop(mapper: rm.Mapper) -> None:
    async def main() -> tuple[list[float], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.create_task(ticker())
        results = [r async for r in mapper.aimap([0.3, 0.3, 0.3, 0.3], progress=False, chunksize=1)]
        task.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert results == [0.09] * 4
    assert ticks >= 10  # the loop kept running during the ~0.6 s map


def test_concurrent_amaps_on_one_mapper(mapper: rm.Mapper) -> None:
    async def main() -> list[list[float]]:
        return await asyncio.gather(mapper.amap([1, 2], progress=False), mapper.amap([3, 4], progress=False))

    assert asyncio.run(main()) == [[1, 4], [9, 16]]


def test_exception_arrives_in_order_as_the_users_type(mapper: rm.Mapper) -> None:
    async def main() -> list[float]:
        seen = []
        async for r in mapper.aimap([2, 3, 13, 4], progress=False, chunksize=1):
            seen.append(r)
        return seen

    with pytest.raises(Unlucky, match="13 is unlucky"):
        asyncio.run(main())
    assert asyncio.run(mapper.amap([2, 13], progress=False, return_exceptions=True))[0] == 4


def test_bad_options_raise_at_once(mapper: rm.Mapper) -> None:
    with pytest.raises(rm.ConfigError, match="unknown map option"):
        mapper.aimap([1], colour="red")


def test_breaking_out_early_stops_the_worker(mapper: rm.Mapper) -> None:
    async def main() -> float:
        results = mapper.aimap(range(1000), progress=False)
        first = await anext(results)
        await results.aclose()  # type: ignore[attr-defined]
        return first

    assert asyncio.run(main()) == 0
    assert _aio_threads() == []


def test_cancelling_the_task_stops_the_map_and_its_thread() -> None:
    with rm.mapper(nap, num_replicas=2) as m:

        async def main() -> float:
            task = asyncio.create_task(m.amap([1.0] * 50, progress=False, chunksize=1))
            await asyncio.sleep(0.3)
            task.cancel()
            started = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - started

        assert asyncio.run(main()) < 1.5
        assert _aio_threads() == []
        # The 48 inputs that never started were dropped: the next map runs at once.
        started = time.monotonic()
        assert m.map([0.0, 0.0], progress=False) == [0.0, 0.0]
        assert time.monotonic() - started < 2.0


def test_aimap_unordered_yields_as_completed(mapper: rm.Mapper) -> None:
    async def main() -> tuple[list[float], list[Any]]:
        got = [r async for r in mapper.aimap_unordered([0.6, 0.0, 0.1], progress=False, chunksize=1)]
        errors = [r async for r in mapper.aimap_unordered([2, 13], progress=False, return_exceptions=True)]
        return got, errors

    got, errors = asyncio.run(main())
    assert got[-1] == pytest.approx(0.36) and sorted(got) == pytest.approx([0.0, 0.01, 0.36])
    assert sorted(e for e in errors if not isinstance(e, BaseException)) == [4]
    assert [type(e) for e in errors if isinstance(e, BaseException)] == [Unlucky]
    assert _aio_threads() == []
