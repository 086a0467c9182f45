"""Nothing that user code forks inside a replica outlives the replica."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from processes import assert_all_end, running

import runmap as rm


def fork_children(_: int) -> list[int]:
    """A plain child, and a daemon that left the session (double fork + setsid): their pids."""
    child = subprocess.Popen(["sleep", "1000"])
    read, write = os.pipe()
    if os.fork() == 0:  # the daemon's parent: exits at once, orphaning it
        os.setsid()
        if os.fork() == 0:
            os.close(read)
            os.write(write, str(os.getpid()).encode())
            os.close(write)
            os.execvp("sleep", ["sleep", "1000"])
        os._exit(0)
    os.close(write)
    daemon = int(os.read(read, 64))
    os.close(read)
    return [child.pid, daemon]


def test_no_child_of_user_code_outlives_close() -> None:
    with rm.mapper(fork_children, num_replicas=2) as m:
        pids = [pid for pair in m.map(range(2), chunksize=1, progress=False) for pid in pair]
        assert len(running(pids)) == 4
    assert_all_end(pids, within=5, what="processes forked by user code outlived close()")


def test_the_children_of_a_killed_replica_end_with_it() -> None:
    with rm.LocalCluster(name="reaper") as cluster:
        fn = rm.function(fork_children).to(cluster)
        child, daemon = fn(0)
        servlet = fn.servlet
        os.kill(servlet.pid, signal.SIGKILL)  # type: ignore[arg-type]
        deadline = time.monotonic() + 5
        while servlet.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        cluster.forget(servlet)
        # Its process group is ended; a daemon that left it is beyond reach once its subreaper is killed.
        assert_all_end([child], within=5, what="a child of a SIGKILLed replica outlived it")
        os.kill(daemon, signal.SIGKILL)


def test_servlet_start_is_a_subreaper() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from runmap.server.reaper import become_subreaper; print(become_subreaper())"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")


def test_descendants_from_the_childrens_lists_match_a_scan_of_every_process() -> None:
    from runmap.server import reaper

    before = set(reaper.descendants(os.getpid()))  # this process's own (a template, ...)
    # A child with children of its own, and one that has exited but is not reaped (a zombie: not counted).
    tree = subprocess.Popen(
        ["bash", "-c", "sleep 60 & a=$!; sleep 60 & echo $a $!; wait"], stdout=subprocess.PIPE, text=True
    )
    zombie = subprocess.Popen(["true"])
    grandchildren: list[int] = []
    try:
        assert tree.stdout is not None
        grandchildren = [int(pid) for pid in tree.stdout.readline().split()]
        deadline = time.monotonic() + 10
        while reaper._state(zombie.pid) != b"Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        found = reaper.descendants(os.getpid())
        assert sorted(found) == sorted(reaper._descendants_by_scan(os.getpid()))
        assert set(found) - before == {tree.pid, *grandchildren}  # the zombie is not counted
    finally:
        for pid in grandchildren:
            os.kill(pid, signal.SIGKILL)
        tree.kill()
        tree.wait()
        tree.stdout.close()  # type: ignore[union-attr]
        zombie.wait()


def test_without_the_childrens_lists_every_process_is_scanned(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from runmap.server import reaper

    before = set(reaper.descendants(os.getpid()))
    child = subprocess.Popen(["sleep", "60"])
    try:
        monkeypatch.setattr(reaper, "_children", lambda pid: None)
        assert set(reaper.descendants(os.getpid())) - before == {child.pid}
    finally:
        child.kill()
        child.wait()
