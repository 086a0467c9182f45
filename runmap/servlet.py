"""The client's handle on a running servlet, whatever cluster it runs on.

A servlet is two things, whichever kind of cluster launched it:

- an :class:`~runmap.transport.endpoint.Endpoint`: how to reach it (a small
  value that can be pickled and sent to another process);
- a :class:`~runmap.cluster.process.ServletProcess`: what runs it, how it
  ended, how to stop it, how to watch it, where its log is.

Everything above (remote modules, the Mapper's pool, the registry) talks to a
replica through this class only, so local, SSH and Ray replicas are reached,
watched, replaced and logged the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runmap.cluster.process import ExitStatus, ServletProcess
from runmap.transport.base import Channel
from runmap.transport.endpoint import Endpoint

if TYPE_CHECKING:
    from runmap.cluster.base import Cluster
    from runmap.envs.env import Env


class Servlet:
    """One env replica on one cluster: its endpoint and its process.

    Attributes:
        name: the replica's name (its env's).
        env: the env it runs.
        cluster: the cluster that launched it.
        endpoint: how to reach it.
        process: what runs it.
    """

    def __init__(self, env: Env, cluster: Cluster, endpoint: Endpoint, process: ServletProcess) -> None:
        self.name = env.name
        self.env = env
        self.cluster = cluster
        self.endpoint = endpoint
        self.process = process
        self._local = threading.local()
        self._channels: list[Channel] = []
        self._lock = threading.Lock()
        self._watchers: list[Callable[[Servlet], None]] = []
        self._watching = False

    # ------------------------------------------------------------- reaching

    def open_channel(self) -> Channel:
        """A new connection, owned by the caller, who must close it."""
        return self.endpoint.open_channel()

    def channel(self) -> Channel:
        """This thread's shared connection, for one-off calls from user code."""
        chan: Channel | None = getattr(self._local, "channel", None)
        if chan is None:
            chan = self.open_channel()
            self._local.channel = chan
            with self._lock:
                self._channels.append(chan)
        return chan

    # ------------------------------------------------------------- watching

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def host(self) -> str:
        return self.process.host

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def output_done(self) -> bool:
        """Whether all it will ever print is in its log (it ended, and its output was copied); never blocks."""
        return self.process.output_done()

    def exit_status(self) -> ExitStatus | None:
        """``None`` while it runs; how it ended (data: code, signal, host lost, ...) once it has."""
        return self.process.poll()

    def exit_reason(self) -> str:
        """What became of the process, in words: ``"SIGKILL(-9)"``, ``"exit code 1"``, ``"running"``."""
        status = self.process.poll()
        return "running" if status is None else str(status)

    def on_exit(self, callback: Callable[[Servlet], None]) -> None:
        """Calls ``callback(self)`` once, as soon as the process ends (from another thread)."""
        with self._lock:
            self._watchers.append(callback)
            start = not self._watching
            self._watching = True
        if start:
            self.process.watch(self._exited)

    def forget_watcher(self, callback: Callable[[Servlet], None]) -> None:
        with self._lock:
            if callback in self._watchers:
                self._watchers.remove(callback)

    def _exited(self) -> None:
        with self._lock:
            watchers, self._watchers = self._watchers, []
        for callback in watchers:
            callback(self)

    # ------------------------------------------------------------- stopping

    def stop(self) -> None:
        """Ends the servlet and closes the connections opened through :meth:`channel`.

        A servlet that had already died keeps its own account of why.
        """
        self._close_channels()
        self.process.stop()

    def kill(self) -> None:
        """Ends the servlet at once, even in the middle of a call."""
        self._close_channels()
        self.process.kill()

    def release(self) -> None:
        """Frees what this handle holds (connections, pipes), leaving a live process alone."""
        self._close_channels()
        self.process.release()

    def _close_channels(self) -> None:
        with self._lock:
            channels, self._channels = self._channels, []
        for chan in channels:
            chan.close()

    def describe(self) -> dict[str, Any]:
        """A plain record of it, without the token: for the registry and ``runmap status``."""
        return {
            "name": self.name,
            "env": self.env.origin,
            "endpoint": str(self.endpoint),
            "host": self.process.host,
            "pid": self.process.pid,
            "local_pid": self.process.local_pid,
            "log": str(self.process.log) if self.process.log else None,
        }

    def __repr__(self) -> str:
        return f"<Servlet {self.name} on {self.cluster.name} at {self.endpoint} pid={self.pid}>"
