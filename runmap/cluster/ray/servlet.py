"""The client's handle on a servlet in a Ray actor: alive, dead, and why."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from runmap.cluster.ray.actor import translate_errors
from runmap.envs.env import Env
from runmap.exceptions import ClusterError, ReplicaDiedError
from runmap.servlet import HTTPServlet
from runmap.transport.base import Channel
from runmap.transport.http import HTTPChannel

if TYPE_CHECKING:
    from runmap.cluster.ray.cluster import RayCluster

PING_TIMEOUT = 1.0
ALIVE_CACHE_SECONDS = 0.25
# A node that vanishes without closing its sockets (power loss, partition) is
# noticed by TCP keepalive after about IDLE + INTERVAL * COUNT seconds.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3


class _KeepAliveChannel(HTTPChannel):
    """An HTTP channel whose socket notices a peer machine that vanished.

    A replica whose process dies closes its sockets, and the call fails at
    once; a node that drops off the network closes nothing, and without
    keepalive a call waiting on it would wait forever.
    """

    def _connect(self) -> Any:
        conn = super()._connect()
        # The channel connects with a socket of its own or through http.client: take either.
        sock = conn if isinstance(conn, socket.socket) else conn.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
            ("TCP_USER_TIMEOUT", 1000 * (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT)),
        ):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        return conn


class RayServlet(HTTPServlet):
    """A servlet inside a Ray actor.

    Attributes:
        actor: the Ray actor handle.
        node_id: the Ray node it was placed on.
    """

    def __init__(
        self, name: str, env: Env, cluster: RayCluster, host: str, port: int, actor: Any, pid: int, node_id: str
    ) -> None:
        super().__init__(name, env, cluster, host, port)
        self.actor = actor
        self.node_id = node_id
        self._pid = pid
        self._death: str | None = None
        self._checked = 0.0
        self._check_lock = threading.Lock()
        self._pending_cause: Any = None

    @property
    def pid(self) -> int | None:
        """The actor's process id, on its node."""
        return self._pid

    def open_channel(self) -> Channel:
        return _KeepAliveChannel(self.host, self.port, self.cluster.token, self.name)

    def is_alive(self) -> bool:
        """Asks the actor (at most every ``ALIVE_CACHE_SECONDS``); a dead actor stays dead.

        Ray may take seconds to declare a lost node's actors dead. Meanwhile, an
        actor that does not answer a ping is dead if its servlet's port refuses
        connections (its process is gone), and alive otherwise: a slow node is
        not a lost one.
        """
        if self.stopped or self._death is not None:
            return False
        with self._check_lock:
            if self._death is None and time.monotonic() - self._checked > ALIVE_CACHE_SECONDS:
                self._ping()
                self._checked = time.monotonic()
        return self._death is None

    def _ping(self) -> None:
        import ray

        if not ray.is_initialized():
            self._death = "Ray was shut down"
            return
        ref = self.actor.ping.remote()
        ready, _ = ray.wait([ref], timeout=PING_TIMEOUT)
        if ready:
            self._read_ping(ref)
        elif not _listening(self.host, self.port):
            self._death = f"{self.name} no longer listens at {self.host}:{self.port}: its process or node is gone"
            self._pending_cause = ref  # Ray's own account, once it has one

    def _read_ping(self, ref: Any) -> None:
        import ray

        try:
            with translate_errors(f"the actor of {self.name} on {self.host}", self.name):
                serving = ray.get(ref)
        except ReplicaDiedError as exc:
            self._death = str(exc)
        except ClusterError:
            pass  # not known to be dead
        else:
            if not serving:
                self._death = f"the servlet thread in the actor of {self.name} on {self.host} ended"

    def exit_reason(self) -> str:
        if self.stopped:
            return "stopped by runmap"
        if self.is_alive():
            return "running"
        import ray

        pending = self._pending_cause
        if pending is not None and ray.is_initialized() and ray.wait([pending], timeout=0)[0]:
            self._pending_cause = None
            self._read_ping(pending)  # replaces "no longer listens" with why, e.g. its node died
        return self._death or "gone"

    def _terminate(self) -> None:
        kill_actor(self.actor)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "node_id": self.node_id}


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
