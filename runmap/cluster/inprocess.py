"""A cluster whose servlets live in this process: for fast unit tests of the layers above.

Calls still go through the servlet's logic and are pickled both ways; only the
process and the HTTP hop are missing. A stopped in-process servlet behaves
like a dead one (its channels raise ``ReplicaDiedError``).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable

from runmap.cluster.base import Cluster, new_token
from runmap.cluster.process import STOPPED, ExitKind, ExitStatus, ServletProcess
from runmap.envs.env import Env
from runmap.server.state import ServletState
from runmap.servlet import Servlet
from runmap.transport import inprocess
from runmap.transport.endpoint import INPROCESS, Endpoint


class InProcessServletProcess(ServletProcess):
    """A servlet's state in this process; "killing" it makes it behave as if its process died."""

    def __init__(self, address: str, state: ServletState) -> None:
        self.address = address
        self.state = state
        self.pid = os.getpid()
        self._status: ExitStatus | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        inprocess.serve(address, state, lambda: self._status is None)

    def poll(self) -> ExitStatus | None:
        return self._status

    def _end(self, status: ExitStatus) -> None:
        with self._lock:
            if self._status is not None:
                return
            self._status = status
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def stop(self) -> None:
        self._end(STOPPED)
        inprocess.unserve(self.address)

    def kill(self) -> None:
        self._end(ExitStatus(ExitKind.SIGNALED, signal=9))

    def watch(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if self._status is None:
                self._callbacks.append(callback)
                return
        callback()

    def release(self) -> None:
        if self._status is not None:
            inprocess.unserve(self.address)


class InProcessCluster(Cluster):
    kind = "inprocess"

    def __init__(self, name: str = "inprocess") -> None:
        super().__init__(name)

    def _launch(self, env: Env) -> Servlet:
        address = f"{INPROCESS}{self.name}/{env.name}/{uuid.uuid4().hex[:8]}"
        process = InProcessServletProcess(address, ServletState(env.name))
        return Servlet(env, self, Endpoint(env.name, address, new_token()), process)
