"""The dispatch thread runs on the CPU of the thread reading a map's results, and anywhere once it ends.

Two threads sharing the GIL on two CPUs halved a map's rate of short calls
(runmap/mapper/colocate.py). Linux with at least two CPUs, as CI has.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import runmap as rm
from runmap.mapper import colocate
from runmap.mapper.colocate import CpuFollower

DEADLINE = 5.0


def square(x: int) -> int:
    return x * x


def _allowed(native_id: int) -> set[int]:
    """The CPUs thread ``native_id`` of this process may run on."""
    with open(f"/proc/self/task/{native_id}/status") as f:
        line = next(line for line in f if line.startswith("Cpus_allowed_list:"))
    cpus: set[int] = set()
    for part in line.split(":", 1)[1].strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _dispatch_thread() -> int:
    """The native id of the client's dispatch thread (a Mapper that has mapped has one)."""
    native_id = next(t for t in threading.enumerate() if t.name == "runmap-dispatch").native_id
    assert native_id is not None
    return native_id


def _eventually(check: Callable[[], bool], poke: Callable[[], object] = lambda: None) -> bool:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if check():
            return True
        poke()
        time.sleep(0.01)
    return check()


def test_the_machine_has_cpus_to_choose_from() -> None:
    assert len(os.sched_getaffinity(0)) >= 2, "these tests need two CPUs"


def test_a_follower_pins_its_thread_beside_the_followed_one_and_lets_it_go() -> None:
    everywhere = os.sched_getaffinity(0)
    follower = CpuFollower()
    seen: dict[str, set[int]] = {}

    def pinned_thread() -> None:
        me = threading.get_native_id()
        follower.tick()
        seen["following"] = _allowed(me)
        follower.unfollow(main)
        follower.tick()
        seen["just after"] = _allowed(me)  # a map that follows at once finds it where it was
        time.sleep(colocate.RELEASE_SECONDS + colocate.FOLLOW_SECONDS)
        follower.tick()
        seen["after"] = _allowed(me)

    main = threading.get_native_id()
    follower.follow(main, lambda: True)
    thread = threading.Thread(target=pinned_thread, name="runmap-test-follower")
    thread.start()
    thread.join()
    assert len(seen["following"]) == 1 and seen["following"] <= everywhere
    assert seen["just after"] == seen["following"]
    assert seen["after"] == everywhere


def test_a_follower_of_a_map_of_long_calls_pins_nothing() -> None:
    everywhere = os.sched_getaffinity(0)
    follower = CpuFollower()
    seen: list[set[int]] = []

    def pinned_thread() -> None:
        follower.tick()
        seen.append(_allowed(threading.get_native_id()))

    follower.follow(threading.get_native_id(), lambda: False)
    thread = threading.Thread(target=pinned_thread, name="runmap-test-follower")
    thread.start()
    thread.join()
    assert seen == [everywhere]


def test_the_dispatch_thread_runs_beside_the_map_and_anywhere_after() -> None:
    everywhere = os.sched_getaffinity(0)
    with rm.mapper(square, num_replicas=2, concurrency=2) as m:
        assert m.map([1, 2], progress=False) == [1, 4]  # the dispatch thread is up
        dispatch = _dispatch_thread()
        me = threading.get_native_id()
        pinned = []
        for i, y in enumerate(m.imap(range(100_000), chunksize=1, progress=False)):
            assert y == i * i
            if i % 500 == 0:
                allowed = _allowed(dispatch)
                if len(allowed) == 1 and allowed == {colocate._last_cpu(me)}:
                    pinned.append(i)
                    if len(pinned) >= 3:
                        break
        assert len(pinned) >= 3, "the dispatch thread never ran on the reading thread's CPU"
        # The map is over: the next wake-up of the dispatch thread lets it run anywhere again.
        assert _eventually(lambda: _allowed(dispatch) == everywhere, lambda: m.call(3))


def test_a_map_of_long_calls_leaves_the_dispatch_thread_free() -> None:
    everywhere = os.sched_getaffinity(0)
    with rm.mapper(nap, num_replicas=2) as m:
        m.map([0], progress=False)
        dispatch = _dispatch_thread()
        for i, y in enumerate(m.imap(range(40), chunksize=1, progress=False)):
            assert y == i
            assert _allowed(dispatch) == everywhere, "pinned for calls of 5 ms"


def nap(x: int) -> int:
    time.sleep(0.005)
    return x


def test_a_map_of_adaptive_chunks_leaves_the_dispatch_thread_free() -> None:
    everywhere = os.sched_getaffinity(0)
    with rm.mapper(square, num_replicas=2) as m:
        m.map([0], progress=False)
        dispatch = _dispatch_thread()
        for i, y in enumerate(m.imap(range(300_000), progress=False)):
            if i % 5_000 == 0:
                assert y == i * i
                assert _allowed(dispatch) == everywhere, "pinned for a map of chunks of many inputs"
