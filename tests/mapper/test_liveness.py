"""Replicas that stop answering without dying: noticed without a user timeout."""

from __future__ import annotations

import os
import signal
import time

import runmap as rm

LIVENESS = 2.0


def pid_and_value(x: int) -> tuple[int, int]:
    time.sleep(0.01)
    return os.getpid(), x


def slow_identity(x: int) -> int:
    if x == 0:
        time.sleep(3)
    return x


def test_a_stopped_replica_mid_map_is_replaced_and_the_map_completes() -> None:
    with rm.mapper(pid_and_value, num_replicas=3, liveness_timeout=LIVENESS, replace_dead=True) as m:
        frozen: list[int] = []
        results = []
        started = time.monotonic()
        for i, (pid, x) in enumerate(m.imap(range(600), chunksize=1, progress=False)):
            results.append(x)
            if i == 50:
                frozen.append(pid)
                os.kill(pid, signal.SIGSTOP)  # no timeout= is set: only the liveness probe can notice
        elapsed = time.monotonic() - started
        assert results == list(range(600))
        # Noticed within the liveness bound plus a probe interval or two, not after a user timeout.
        assert elapsed < 600 * 0.01 + LIVENESS + 8, elapsed
        assert frozen and all(r.servlet.pid != frozen[0] for r in m.replicas)
        assert m.num_replicas == 3
    # The frozen process was killed, not left stopped.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(frozen[0], 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"frozen replica {frozen[0]} still exists")


def test_a_timed_out_input_on_a_frozen_replica_is_retried() -> None:
    with rm.mapper(pid_and_value, num_replicas=2, liveness_timeout=60, retries=2) as m:
        victim = m.replicas[0].servlet.pid
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)
        results = m.map(range(40), chunksize=1, timeout=1.0, progress=False)
        assert [x for _, x in results] == list(range(40))
        assert victim not in {pid for pid, _ in results}


def test_a_slow_input_on_a_healthy_replica_still_fails_alone() -> None:
    with rm.mapper(slow_identity, num_replicas=2, liveness_timeout=60, retries=2) as m:
        results = m.map(range(10), chunksize=1, timeout=1.0, return_exceptions=True, progress=False)
        assert isinstance(results[0], rm.ReplicaTimeoutError)
        assert results[1:] == list(range(1, 10))


def test_liveness_timeout_is_validated() -> None:
    for bad in (0, -1, "1", True):
        try:
            rm.mapper(pid_and_value, num_replicas=1, liveness_timeout=bad)
        except rm.ConfigError as exc:
            assert "liveness_timeout" in str(exc)
        else:
            raise AssertionError(f"liveness_timeout={bad!r} was accepted")


def short_then_long(x: int) -> int:
    if x == -1:
        time.sleep(4)  # after many short calls, this one runs on the servlet's event loop
    return x


def test_a_call_that_blocks_the_servlets_loop_past_the_liveness_bound_is_rerun_in_a_thread() -> None:
    with rm.mapper(short_then_long, num_replicas=2, liveness_timeout=LIVENESS, retries=1, replace_dead=False) as m:
        before = {r.name for r in m.replicas}
        # Warm both replicas: their servlets now run this method's calls on their event loops.
        assert m.map(range(400), chunksize=1, progress=False) == list(range(400))
        assert m.call(-1) == -1
        # The replica that ran it on its loop was taken for frozen; the other ran it in a thread.
        assert len(m.replicas) == 1 and {r.name for r in m.replicas} < before
