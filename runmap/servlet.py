"""The client's handle on a running servlet, whatever cluster it runs on.

A cluster launches servlets and hands back a :class:`Servlet`; everything above
(remote modules, the Mapper) talks to it through channels and asks it whether
it is alive and, if not, what happened to it.
"""

from __future__ import annotations

import signal
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from runmap.transport.base import Channel
from runmap.transport.http import HTTPChannel

if TYPE_CHECKING:
    from runmap.cluster.base import Cluster
    from runmap.envs.env import Env


def describe_returncode(code: int | None) -> str:
    """``-9`` -> ``"SIGKILL(-9)"``, ``1`` -> ``"exit code 1"``, as loky words it."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"{signal.Signals(-code).name}({code})"
        except ValueError:
            return f"signal {-code}({code})"
    return f"exit code {code}"


class Servlet(ABC):
    """A servlet process: one env replica on one cluster."""

    def __init__(self, name: str, env: Env, cluster: Cluster) -> None:
        self.name = name
        self.env = env
        self.cluster = cluster
        self._local = threading.local()
        self._channels: list[Channel] = []
        self._lock = threading.Lock()
        self._stopped = False

    @abstractmethod
    def open_channel(self) -> Channel:
        """A new connection, owned by the caller, who must close it."""

    @abstractmethod
    def is_alive(self) -> bool: ...

    @abstractmethod
    def _terminate(self) -> None:
        """Ends the process (or actor); must be safe to call twice."""

    @property
    def pid(self) -> int | None:
        return None

    def exit_reason(self) -> str:
        """What became of the process: ``"SIGKILL(-9)"``, ``"exit code 1"``, ..."""
        return "stopped" if self._stopped else ("running" if self.is_alive() else "gone")

    def channel(self) -> Channel:
        """This thread's shared connection, for one-off calls from user code."""
        chan: Channel | None = getattr(self._local, "channel", None)
        if chan is None:
            chan = self.open_channel()
            self._local.channel = chan
            with self._lock:
                self._channels.append(chan)
        return chan

    def stop(self) -> None:
        """Ends the servlet and closes the connections opened through :meth:`channel`.

        A servlet that had already died keeps its own account of why
        (:meth:`exit_reason`); only a live one becomes "stopped".
        """
        alive = not self._stopped and self.is_alive()
        with self._lock:
            self._stopped = self._stopped or alive
        self.release()
        self._terminate()

    def release(self) -> None:
        """Frees what this handle holds (connections, pipes), leaving the process alone."""
        with self._lock:
            channels, self._channels = self._channels, []
        for chan in channels:
            chan.close()

    def kill(self) -> None:
        """Ends the servlet at once, even in the middle of a call."""
        self.stop()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.cluster.name} pid={self.pid}>"


class HTTPServlet(Servlet):
    """A servlet reached over HTTP at ``host:port`` with the cluster's token."""

    def __init__(self, name: str, env: Env, cluster: Cluster, host: str, port: int) -> None:
        super().__init__(name, env, cluster)
        self.host = host
        self.port = port

    def open_channel(self) -> Channel:
        return HTTPChannel(self.host, self.port, self.cluster.token, self.name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "env": self.env.origin, "host": self.host, "port": self.port, "pid": self.pid}
