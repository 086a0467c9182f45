"""A cluster whose servlets live in this process: for fast unit tests of the layers above.

Calls still go through the servlet's logic and are pickled both ways; only the
process and the HTTP hop are missing. A stopped in-process servlet behaves
like a dead one (its channels raise ``ReplicaDiedError``).
"""

from __future__ import annotations

import os

from runmap.cluster.base import Cluster
from runmap.envs.env import Env
from runmap.server.state import ServletState
from runmap.servlet import Servlet
from runmap.transport.base import Channel
from runmap.transport.inprocess import InProcessChannel


class InProcessServlet(Servlet):
    def __init__(self, name: str, env: Env, cluster: Cluster) -> None:
        super().__init__(name, env, cluster)
        self.state = ServletState(name)
        self._alive = True

    @property
    def pid(self) -> int | None:
        return os.getpid()

    def open_channel(self) -> Channel:
        return InProcessChannel(self.state, self.is_alive)

    def is_alive(self) -> bool:
        return self._alive

    def kill(self) -> None:
        """Makes the servlet behave as if its process had died."""
        self._alive = False

    def _terminate(self) -> None:
        self._alive = False


class InProcessCluster(Cluster):
    kind = "inprocess"

    def __init__(self, name: str = "inprocess") -> None:
        super().__init__(name)

    def _launch(self, env: Env) -> InProcessServlet:
        return InProcessServlet(env.name, env, self)
