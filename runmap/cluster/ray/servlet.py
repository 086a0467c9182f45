"""The process behind a servlet in a Ray actor: alive, dead, and why."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runmap.cluster.process import STOPPED, ExitKind, ExitStatus, ServletProcess
from runmap.cluster.ray.actor import translate_errors
from runmap.exceptions import ClusterError, ReplicaDiedError

PING_TIMEOUT = 1.0
ALIVE_CACHE_SECONDS = 0.25


class RayActorProcess(ServletProcess):
    """A servlet inside a Ray actor.

    Attributes:
        actor: the Ray actor handle.
        node_id: the Ray node it was placed on.
    """

    def __init__(self, name: str, actor: Any, host: str, port: int, pid: int, node_id: str, log: Path | None) -> None:
        self.name = name
        self.actor = actor
        self.host = host
        self.port = port
        self.pid = pid
        self.node_id = node_id
        self.log = log
        self.local_pid = None  # the node may be another machine; `runmap down` stops it through its client
        self._status: ExitStatus | None = None
        self._checked = 0.0
        self._check_lock = threading.Lock()
        self._pending_cause: Any = None

    def poll(self) -> ExitStatus | None:
        """Asks the actor (at most every ``ALIVE_CACHE_SECONDS``); a dead actor stays dead.

        Ray may take seconds to declare a lost node's actors dead. Meanwhile, an
        actor that does not answer a ping is dead if its servlet's port refuses
        connections (its process is gone), and alive otherwise: a slow node is
        not a lost one.
        """
        if self._status is not None:
            if self._pending_cause is not None:
                self._read_pending_cause()
            return self._status
        with self._check_lock:
            if self._status is None and time.monotonic() - self._checked > ALIVE_CACHE_SECONDS:
                self._ping()
                self._checked = time.monotonic()
        return self._status

    def _ping(self) -> None:
        import ray

        if not ray.is_initialized():
            self._status = ExitStatus(ExitKind.GONE, cause="Ray was shut down")
            return
        ref = self.actor.ping.remote()
        ready, _ = ray.wait([ref], timeout=PING_TIMEOUT)
        if ready:
            self._read_ping(ref)
        elif not _listening(self.host, self.port):
            self._status = ExitStatus(
                ExitKind.GONE,
                cause=f"{self.name} no longer listens at {self.host}:{self.port}: its process or node is gone",
            )
            self._pending_cause = ref  # Ray's own account, once it has one

    def _read_ping(self, ref: Any) -> None:
        import ray

        try:
            with translate_errors(f"the actor of {self.name} on {self.host}", self.name):
                serving = ray.get(ref)
        except ReplicaDiedError as exc:
            cause = str(exc)
            kind = ExitKind.NODE_DIED if "node" in cause and "died" in cause else ExitKind.GONE
            self._status = ExitStatus(kind, cause=cause)
        except ClusterError:
            pass  # not known to be dead
        else:
            if not serving:
                self._status = ExitStatus(
                    ExitKind.GONE, cause=f"the servlet thread in the actor of {self.name} on {self.host} ended"
                )

    def _read_pending_cause(self) -> None:
        import ray

        pending = self._pending_cause
        if pending is not None and ray.is_initialized() and ray.wait([pending], timeout=0)[0]:
            self._pending_cause = None
            before, self._status = self._status, None
            self._read_ping(pending)  # replaces "no longer listens" with why, e.g. its node died
            if self._status is None:
                self._status = before  # Ray knows no more than we did

    def stop(self) -> None:
        if self.poll() is None:
            self._status = STOPPED
        kill_actor(self.actor)

    def watch(self, callback: Callable[[], None]) -> None:
        """A call that returns only when the actor ends: its ref completes (with Ray's error) at its death."""
        try:
            ref = self.actor.wait_stopped.remote()
            ref.future().add_done_callback(lambda _: callback())
        except Exception:  # Ray is gone already: so is the actor
            callback()

    def release(self) -> None:
        pass


def _listening(host: str, port: int) -> bool:
    """False only if ``host`` refuses connections to ``port``: nothing listens there any more."""
    try:
        with socket.create_connection((host, port), timeout=PING_TIMEOUT):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # unreachable or slow: not proof that the servlet is gone


def kill_actor(actor: Any) -> None:
    import ray

    if not ray.is_initialized():
        return  # Ray is gone, and the actors with it (they share their owner's fate)
    with contextlib.suppress(Exception):  # already dead, or Ray is shutting down
        ray.kill(actor, no_restart=True)
