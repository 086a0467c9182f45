"""Shared fixtures. Every test fails if it leaves a child process or a thread behind."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from sshd_hosts import ssh_hosts  # noqa: F401  (session fixture: real sshd hosts on loopback)

import runmap as rm
from runmap.cluster import template
from runmap.cluster.inprocess import InProcessCluster

# Local replicas are forked from this process's template (runmap/cluster/template.py), which lives as
# long as the interpreter. Started here, before any test, it is no test's leak; the replicas it forks
# are still this process's descendants, so a replica a test leaves behind is still caught.
template.warm()

# Threads that third-party libraries start once per process and keep on purpose (tqdm's
# monitor, AnyIO's worker threads). Every thread runmap starts is named "runmap-...", and checked.
_LONG_LIVED_THREADS = ("TMonitor", "AnyIO worker thread")
LEAK_GRACE_SECONDS = 10.0


def _children() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and not _idle_ray_worker(p)
    }


def _idle_ray_worker(process: psutil.Process) -> bool:
    """A worker a Ray node of a module's fixture keeps ready, holding no actor and no task (``ray::IDLE``).

    Its raylet starts one when it likes, during whichever test runs then (it failed a unit test
    that started nothing, once). A replica a test leaves on Ray is an actor's worker, named after
    the actor's class, and is still caught.
    """
    try:
        return process.name() == "ray::IDLE"
    except psutil.Error:
        return False


def _threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if not t.name.startswith(_LONG_LIVED_THREADS) and type(t).__name__ != "TMonitor"
    }


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test if a child process or thread it started outlives it."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    procs_before = _children()
    threads_before = _threads()
    yield
    # Garbage is not a leak: what ends when its owner is collected (a joblib backend kept warm for a
    # parallel_config block is freed with joblib's own reference cycles) ends at this collection.
    gc.collect()
    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    while True:
        procs = _children() - procs_before
        threads = _threads() - threads_before
        if not procs and not threads:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    described = [f"pid {p}: {' '.join(psutil.Process(p).cmdline())}" for p in procs if psutil.pid_exists(p)]
    for pid in procs:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    pytest.fail(f"left behind: processes {described}, threads {sorted(t.name for t in threads)}")


@pytest.fixture
def cluster() -> Iterator[rm.LocalCluster]:
    """A fresh local cluster, closed after the test."""
    with rm.LocalCluster(name="test") as c:
        yield c


@pytest.fixture
def inprocess() -> Iterator[InProcessCluster]:
    """A cluster whose servlets run in this process (dispatch unit tests)."""
    with InProcessCluster() as c:
        yield c
