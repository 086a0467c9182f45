"""Where the servlet runs a call (runmap/server/app.py): what counts as a short call.

A call that waits of its own accord (sleep, I/O, a lock) must never pass for a short
CPU-bound one, whatever else happens; a CPU-bound call that the kernel preempts is
timed by its CPU time, so a busy machine does not send it to the threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from runmap.server import app


def test_a_call_that_sleeps_is_timed_by_its_wall_time() -> None:
    _, wall, cpu = app._timed(lambda: time.sleep(0.02) or b"")
    assert wall >= 0.02 and cpu < 0.01
    placement = app.CallPlacement()
    placement.record(("m", "f"), wall, cpu)
    assert not placement.inline(("m", "f"))


def test_a_preempted_cpu_bound_call_counts_its_cpu_time() -> None:
    assert app._RUSAGE_THREAD is not None  # Linux: the switch counts this relies on
    # Two busy processes pinned to this process's CPU take it from the call, over and over.
    cpu = min(os.sched_getaffinity(0))
    hog = f"import os; os.sched_setaffinity(0, {{{cpu}}}); exec('while 1: pass')"
    hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(2)]
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.2)  # the hogs are running

        def spin() -> bytes:
            deadline = time.thread_time() + 0.05
            while time.thread_time() < deadline:
                pass
            return b""

        _, wall, used = app._timed(spin)
        assert used >= 0.05
        assert wall <= used  # it waited for the CPU, not for anything of its own
    finally:
        os.sched_setaffinity(0, before)
        for hog in hogs:
            hog.kill()
            hog.wait()
