"""The crash table, shared by every cluster kind's failure tests.

Each row is a way for a replica to fail in the middle of a map of hundreds of inputs (after
loky's table), and what the user must see.
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import threading
import time

import pytest

import runmap as rm

N = 300
POISON = 150


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def crash_at(x: int, case: str, marker: str | None = None) -> int:
    """Fails on input POISON; with a marker file, only the first time."""
    if x == POISON and (marker is None or not os.path.exists(marker)):
        if marker is not None:
            open(marker, "w").close()
        if case == "exit":
            os._exit(1)
        if case == "segv":
            faulthandler._sigsegv()  # type: ignore[attr-defined]
        if case == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if case == "memory":
            raise MemoryError("out of memory on 150")
        if case == "unpicklable":
            raise Unpicklable()
        if case == "hang":
            time.sleep(60)
    return 2 * x


EXPECTED = [2 * x for x in range(N)]


def fates(mapper: rm.Mapper) -> dict[str, str]:
    """What became of each replica the Mapper has had."""
    return {r.name: r.reason or "alive" for r in mapper._pool.replicas}

# (case, mapper options, error type in slot POISON, pattern of its message)
CRASHES = [
    ("exit", {"retries": 1}, rm.ReplicaDiedError, r"inputs? 150.*exit code 1"),
    ("segv", {"retries": 1}, rm.ReplicaDiedError, r"inputs? 150.*SIGSEGV\(-11\)"),
    ("sigkill", {"retries": 1}, rm.ReplicaDiedError, r"inputs? 150.*SIGKILL\(-9\)"),
    ("memory", {}, MemoryError, r"out of memory on 150"),
    ("unpicklable", {}, rm.RemoteError, r"Unpicklable: holds a lock"),
    ("hang", {"timeout": 1.0}, rm.ReplicaTimeoutError, r"inputs? 150.*timeout of 1 s"),
]


def check_crash(mapper: rm.Mapper, case: str, error: type, pattern: str) -> None:
    """One row of the crash table, on ``mapper``'s replicas (of any cluster kind)."""
    results = mapper.map(range(N), kwargs={"case": case}, return_exceptions=True, progress=False)
    assert isinstance(results[POISON], error), results[POISON]
    assert re.search(pattern, str(results[POISON])), str(results[POISON])
    wrong = {i: r for i, r in enumerate(results) if i != POISON and r != EXPECTED[i]}
    assert not wrong, f"inputs beside the poison went wrong: {wrong}; replicas: {fates(mapper)}"
    # Raised, not returned, without return_exceptions; and the Mapper still works after.
    with pytest.raises(error):
        mapper.map(range(N), kwargs={"case": case}, progress=False)
    assert mapper.map(range(10), kwargs={"case": "none"}, progress=False) == EXPECTED[:10]
