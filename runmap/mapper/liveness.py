"""Replicas that stop answering are noticed without a user timeout.

A replica can hang without dying: a process stopped with SIGSTOP, a servlet
whose event loop deadlocked, a host that stops answering without closing its
connections. Calls in flight on it would wait forever, and a map without
``timeout=`` with them. So one thread per pool asks every replica in rotation
``GET /health`` on a connection of its own, every ``interval`` seconds. The
servlet answers it from its event loop, which user code never blocks (calls
run in threads), so a healthy replica answers at once however busy it is. A
replica that has not answered for ``liveness_timeout`` seconds is killed and
retired: its calls in flight fail over to other replicas (they count as an
attempt: the replica failed, not the input), and a replacement is started.

The same probe tells a timed-out call on a frozen replica (retried) from one
on a healthy replica (the input was too slow: it fails alone), see
:meth:`ReplicaPool.timed_out`.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from runmap.exceptions import ReplicaError
from runmap.transport.base import Channel

if TYPE_CHECKING:
    from runmap.mapper.pool import Replica, ReplicaPool

DEFAULT_LIVENESS_TIMEOUT = 30.0
MAX_INTERVAL = 1.0
MAX_PROBE_TIMEOUT = 5.0


def probe(channel: Channel, timeout: float) -> bool:
    """Whether the servlet behind ``channel`` answers ``/health`` within ``timeout`` seconds."""
    try:
        channel.ping(timeout)
    except ReplicaError:
        return False
    return True


class LivenessMonitor:
    """Probes a pool's replicas in a thread of its own and retires those that stop answering.

    Args:
        pool: the replicas to watch.
        timeout: seconds without an answer after which a replica is killed.
    """

    def __init__(self, pool: ReplicaPool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout
        self.interval = min(MAX_INTERVAL, timeout / 4)
        self.probe_timeout = min(MAX_PROBE_TIMEOUT, max(self.interval, timeout / 3))
        self._last_answer: dict[Replica, float] = {}
        self._channels: dict[Replica, Channel] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runmap-liveness", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                for replica in self.pool.alive:
                    if self._stop.is_set():
                        return
                    self._check(replica)
                self._forget_retired()
        finally:
            for channel in self._channels.values():
                channel.close()

    def _check(self, replica: Replica) -> None:
        now = time.monotonic()
        last = self._last_answer.setdefault(replica, now)
        channel = self._channels.get(replica)
        if channel is None:
            channel = self._channels[replica] = replica.remote.servlet.open_channel()
        if probe(channel, self.probe_timeout):
            self._last_answer[replica] = time.monotonic()
            return
        if self._stop.is_set():
            return  # the probe was cut short by close(), not by the replica
        if not replica.remote.servlet.is_alive():
            self.pool.retire_dead(replica)
        elif time.monotonic() - last >= self.timeout:
            self.pool.retire_frozen(replica, f"stopped answering for {time.monotonic() - last:.0f} s (frozen?)")

    def _forget_retired(self) -> None:
        for replica in [r for r in self._channels if r.retired]:
            self._channels.pop(replica).close()
            self._last_answer.pop(replica, None)

    def close(self) -> None:
        self._stop.set()
        for channel in list(self._channels.values()):
            channel.abort()  # a probe waiting on a frozen replica returns now
        if self._thread is not threading.current_thread():
            self._thread.join(5)
