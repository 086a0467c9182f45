"""What every cluster does: start servlets for envs, name replicas, and clean up.

A cluster kind differs from the others in how it launches a servlet
(:meth:`Cluster._launch`), which hands back a :class:`~runmap.servlet.Servlet`:
an endpoint to reach it and a process handle to watch, stop and log it. The
bookkeeping here (names, one servlet per env, logs, the registry) is shared.
Every cluster
registers itself so that whatever is still open when the interpreter exits is
closed then: nothing runmap starts outlives its client. Each cluster records its
servlets in the registry (:mod:`runmap.registry`) that the ``runmap`` command reads.
"""

from __future__ import annotations

import atexit
import base64
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from runmap import _threads, logs, registry
from runmap.envs.env import Env
from runmap.exceptions import ClusterError, ConfigError
from runmap.servlet import Servlet

_open_clusters: weakref.WeakSet[Cluster] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for cluster in list(_open_clusters):
        try:
            cluster.close()
        except Exception:  # at exit, one cluster's failure must not keep the others alive
            pass


class Cluster(ABC):
    """Where servlets run. Use as a context manager, or call :meth:`close`.

    Attributes:
        name: the cluster's name, shown in replica descriptions and ``runmap status``.

    Each servlet demands a token of its own (:func:`new_token`, made by ``_launch``), which
    only its ``Endpoint`` holds: whoever takes a dead servlet's address (its loopback
    port, on this machine or a host) and so receives what a client sends there learns
    nothing that opens another servlet.
    """

    kind = "base"
    # Whether its servlets run where the client's own files are not (other
    # machines): then the client's own functions and classes travel by value.
    remote_files = False

    def __init__(self, name: str, stream_logs: bool = True) -> None:
        self.name = name
        self.stream_logs = stream_logs
        self._servlets: dict[str, Servlet] = {}
        self._stopping: set[Servlet] = set()  # ended by stop_servlet, which updates the registry after
        self._starting: dict[str, threading.Lock] = {}
        self._replica_counters: dict[str, int] = {}
        self._lock = threading.RLock()
        self._closed = False
        self.closed_reason: str | None = None  # why it was closed, when not by its own client
        _open_clusters.add(self)

    # ------------------------------------------------------------ launching

    @abstractmethod
    def _launch(self, env: Env) -> Servlet:
        """Starts a servlet for ``env`` and returns once it answers requests."""

    def servlet(self, env: Env | None = None) -> Servlet:
        """The servlet of ``env`` on this cluster, started if it isn't running."""
        env = env or Env()
        with self._lock:
            self._check_open()
            existing = self._servlets.get(env.name)
            if existing is not None and existing.is_alive():
                return existing
            gate = self._starting.setdefault(env.name, threading.Lock())
        with gate:  # two threads asking for one env start one servlet
            with self._lock:
                existing = self._servlets.get(env.name)
                if existing is not None and existing.is_alive():
                    return existing
            return self.start_servlet(env)

    def start_servlet(self, env: Env) -> Servlet:
        """Starts a new servlet for ``env``, which must not be running here yet."""
        with self._lock:
            self._check_open()
            running = self._servlets.get(env.name)
            if running is not None and running.is_alive():
                raise ClusterError(f"{env.name!r} already runs on cluster {self.name!r}")
        servlet = self._launch(env)
        with self._lock:
            if self._closed:
                servlet.stop()
                self._check_open()
            self._servlets[env.name] = servlet
        servlet.on_exit(self._servlet_exited)
        if self.stream_logs and servlet.process.log is not None:
            logs.follow(servlet, servlet.process.log, servlet.process.log_offset)
        registry.update(self)
        return servlet

    def replica_env(self, env: Env) -> Env:
        """The next replica of ``env``: ``<origin>_replica_<i>``, ``i`` never reused."""
        with self._lock:
            i = self._replica_counters.get(env.origin, 0) + 1
            while env.replicate(i).name in self._servlets:
                i += 1
            self._replica_counters[env.origin] = i
            return env.replicate(i)

    def unique_env(self, env: Env) -> Env:
        """``env`` renamed, if need be, to a name no servlet here has used."""
        with self._lock:
            name, n = env.name, 1
            while name in self._servlets or name in self._starting:
                n += 1
                name = f"{env.name}_{n}"
            self._starting.setdefault(name, threading.Lock())
            return env if name == env.name else env.renamed(name)

    def registry_details(self) -> dict[str, Any]:
        """What the kind records of itself beside its servlets, for ``runmap status`` (EC2: its instances)."""
        return {}

    def from_inside(self) -> Callable[[], Cluster]:
        """How one of this cluster's servlets reaches the cluster itself: a picklable factory.

        A Mapper placed on the cluster (:meth:`runmap.Mapper.to`) calls it in its
        servlet to start its replicas there, placed as this cluster places them.
        """
        raise ConfigError(f"a Mapper cannot be placed on a {self.kind} cluster ({self.name!r})")

    # ------------------------------------------------------------- stopping

    def stop_servlet(self, servlet: Servlet) -> None:
        """Ends ``servlet`` and drops it from this cluster's books."""
        with self._lock:
            self._stopping.add(servlet)
        try:
            servlet.stop()
            logs.unfollow(servlet)
            self.forget(servlet)
        finally:
            with self._lock:
                self._stopping.discard(servlet)

    def _servlet_exited(self, servlet: Servlet) -> None:
        """One of its servlets ended (from the watcher's thread)."""
        with self._lock:
            if servlet in self._stopping:
                return  # stopped on purpose: stop_servlet updates the books once it is gone
        if not self._closed and registry.shut_down_from_cli(self):
            # `runmap down` ended its servlets: the cluster ends with them, they are not replaced.
            self.closed_reason = "shut down from the command line (runmap down)"
            # Not on the watcher's thread: closing takes a while, and other deaths must still be heard.
            threading.Thread(target=self._close_after_down, name=f"runmap-down-{self.name}", daemon=True).start()
        else:
            registry.update(self)

    def _close_after_down(self) -> None:
        """Closes the cluster once ``runmap down``, which signalled every servlet of it, has ended them.

        Each is let end of that signal first (a loaded machine may take a moment), so that
        each reports what ended it, not a stop of this cluster's that came after.
        """
        from runmap.cluster.process import STOP_GRACE

        deadline = time.monotonic() + STOP_GRACE
        for servlet in self.servlets:
            while servlet.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
        self.close()

    def forget(self, servlet: Servlet) -> None:
        """Drops a servlet that died from this cluster's books, leaving what remains of it alone.

        Stopping a dead servlet could overwrite its cause of death (Ray reports
        an actor killed afterwards as "killed by ray.kill", not "its node died").
        """
        with self._lock:
            if self._servlets.get(servlet.env.name) is servlet:
                del self._servlets[servlet.env.name]
        servlet.release()
        registry.update(self)

    @property
    def servlets(self) -> list[Servlet]:
        with self._lock:
            return list(self._servlets.values())

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stops every servlet of this cluster. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            servlets = list(self._servlets.values())
            self._servlets.clear()
        _open_clusters.discard(self)
        if servlets:
            _threads.each(lambda s: s.stop(), servlets, "runmap-stop")
            for servlet in servlets:
                logs.unfollow(servlet)
        registry.remove(self)

    def _check_open(self) -> None:
        if self._closed:
            why = f": {self.closed_reason}" if self.closed_reason else ""
            raise ClusterError(f"cluster {self.name!r} is closed{why}")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._servlets)} servlets"
        return f"<{type(self).__name__} {self.name!r} {state}>"


def new_token() -> str:
    """A servlet's token: 32 bytes from the OS's CSPRNG, URL-safe (``secrets.token_urlsafe(32)``, whose
    import, through ``hmac`` and ``random``, would cost a short script a tenth of its start-up)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")
