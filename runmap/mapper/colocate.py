"""The dispatch thread runs on the CPU of the thread that reads a map's results.

The two threads of a map share the client's GIL: the dispatch thread sends
calls and reads answers (each ``send``, ``recv`` and ``select`` lets go of the
GIL), and the thread that reads the results takes them, reads more inputs and
queues them. On two CPUs, each hand-over of the GIL between them wakes the
other thread through the kernel, and a map of short calls ran at half the rate
for the whole life of a process, whichever way the scheduler had first placed
the threads (measured on 2 vCPUs, chunksize 1, 2 replicas: 51-65k calls/s with
the threads pinned apart, 106-117k pinned together, either of the two at
random unpinned). So while a map of short calls of a fixed chunk size
(``chunksize=``) runs, the dispatch thread pins itself to the CPU that thread
last ran on, and follows it if it moves (looking at most every
``FOLLOW_SECONDS``); with no map for ``RELEASE_SECONDS``, or a map of long
calls or adaptive chunks, it may run anywhere again: those ran faster apart
(:data:`SHORT_CALL_SECONDS`), the copies of large inputs in the kernel (outside
the GIL) and one thread's work overlapping the other's.

Linux only (``/proc/<pid>/task/<tid>/stat``, ``sched_setaffinity``); elsewhere,
or where the affinity cannot be set (a CPU set that forbids it), nothing is pinned.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

FOLLOW_SECONDS = 0.01  # looking costs ~20 µs; at 0.05 s, one process in five still ran at the slow rate
RELEASE_SECONDS = 0.2  # with no map for this long, it runs anywhere again: back-to-back maps keep their CPU
SHORT_CALL_SECONDS = 0.001
"""Only a map of a fixed chunk size whose calls take less (by their average so far) has the dispatch
thread beside it. With 10 MB inputs (each call ~20 ms) the two threads apart moved 612 MB/s,
together 498; with adaptive chunks of trivial inputs (few calls, each many inputs), 10.9M inputs/s
apart, 9.7M together."""


class CpuFollower:
    """Pins the thread that calls :meth:`tick` (the dispatch thread) beside the threads reading results.

    :meth:`follow` and :meth:`unfollow` may be called from any thread; :meth:`tick`
    and :meth:`release` only from the pinned thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The threads reading maps' results (native ids), each with whether its map's calls are short now.
        self._followed: list[tuple[int, Callable[[], bool]]] = []  # the last is followed
        self._works = hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")
        self._allowed: set[int] | None = None  # the pinned thread's CPUs before it was pinned
        self._pinned: int | None = None  # the CPU it is pinned to
        self._next = 0.0  # when to look again where the followed thread runs
        self._idle_since: float | None = None  # when the last map it followed ended

    def follow(self, native_id: int, short: Callable[[], bool]) -> None:
        """Starts following thread ``native_id`` (a map began reading its results there) while ``short()``."""
        with self._lock:
            self._followed.append((native_id, short))
        self._next = 0.0

    def unfollow(self, native_id: int) -> None:
        """Stops following it (its map ended); another map's thread is followed, or none."""
        with self._lock:
            for i in range(len(self._followed) - 1, -1, -1):  # the latest: a thread may run maps one in another
                if self._followed[i][0] == native_id:
                    del self._followed[i]
                    break
        self._next = 0.0

    def tick(self) -> None:
        """From the pinned thread, now and then: moves it beside the followed thread, or unpins it."""
        if not self._works:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + FOLLOW_SECONDS
        with self._lock:
            followed = self._followed[-1] if self._followed else None
        if followed is None:
            if self._idle_since is None:
                self._idle_since = now
            elif now - self._idle_since >= RELEASE_SECONDS:
                self.release()
            return
        self._idle_since = None
        target, short = followed
        if not short():
            self.release()  # long calls: few hand-overs, and the threads' copies run best apart
            return
        cpu = _last_cpu(target)
        if cpu is None or cpu == self._pinned:
            return
        try:
            if self._allowed is None:
                self._allowed = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cpu})
            self._pinned = cpu
        except OSError:  # a CPU set that forbids it: leave the thread where it may run
            self._works = False
            self.release()

    def release(self) -> None:
        """From the pinned thread: it may run on any of its CPUs again."""
        if self._allowed is not None:
            allowed, self._allowed, self._pinned = self._allowed, None, None
            try:
                os.sched_setaffinity(0, allowed)
            except OSError:
                pass


def _last_cpu(native_id: int) -> int | None:
    """The CPU thread ``native_id`` of this process last ran on, None if it is gone."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[36])  # field 39, "processor"
    except (OSError, ValueError, IndexError):
        return None
