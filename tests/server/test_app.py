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
    key = app.placement_key("m", "f", b"x" * 30)
    placement.record(key, wall, cpu)
    assert not placement.inline(key)


def test_a_methods_long_chunks_do_not_send_its_short_ones_to_the_threads() -> None:
    placement = app.CallPlacement()
    one_input, thousands = app.placement_key("m", "f", b"x" * 30), app.placement_key("m", "f", b"x" * 100_000)
    placement.record(one_input, 50e-6, 50e-6)
    placement.record(thousands, 0.02, 0.02)  # a 20 ms chunk: the loop must not be held that long
    assert placement.inline(one_input) and not placement.inline(thousands)
    assert app.placement_key("m", "f", b"y" * 31) == one_input  # keyed by size, not content


SPIN = """
import os, sys, time
from runmap.server import app
os.sched_setaffinity(0, {int(sys.argv[1])})
time.sleep(0.2)  # the hogs are running


def spin():
    deadline = time.thread_time() + 0.05
    while time.thread_time() < deadline:
        pass
    return b""


_, wall, used = app._timed(spin)
print(wall, used)
"""


def test_a_preempted_cpu_bound_call_counts_its_cpu_time() -> None:
    assert app._RUSAGE_THREAD is not None  # Linux: the switch counts this relies on
    # Two busy processes pinned to one CPU take it from the call, over and over. The call runs in a
    # process of its own: a thread of this one (pytest's, tqdm's) taking the GIL would be a wait.
    cpu = min(os.sched_getaffinity(0))
    hog = f"import os; os.sched_setaffinity(0, {{{cpu}}}); exec('while 1: pass')"
    hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(2)]
    try:
        done = subprocess.run([sys.executable, "-c", SPIN, str(cpu)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        wall, used = map(float, done.stdout.split())
        assert used >= 0.05
        assert wall <= used  # it waited for the CPU, not for anything of its own
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
