"""Helpers for tests that watch processes end."""

from __future__ import annotations

import time

import psutil


def running(pids: list[int]) -> list[int]:
    """The pids that still run (a zombie has ended: only its parent has not reaped it)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def assert_all_end(pids: list[int], within: float, what: str) -> None:
    """Fails, after killing them, if any of ``pids`` still runs ``within`` seconds from now."""
    deadline = time.monotonic() + within
    alive = running(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = running(pids)
    for pid in alive:
        psutil.Process(pid).kill()
    assert not alive, what
