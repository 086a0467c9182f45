"""Where a Mapper's replicas come from and go back to: one provider per cluster.

The pool never starts or stops a servlet itself; it asks the provider of the
replica's cluster. A replica is made by placing a module (the target, or a
replica the user supplied) on a new servlet of its env's next replica
(``<env>_replica_<i>``), on the cluster the module lives on: so a replica the
user placed on another cluster is replaced on that cluster, and a Mapper can
mix clusters of every kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runmap.module import Remote

if TYPE_CHECKING:
    from collections.abc import Callable

    from runmap.cluster.base import Cluster
    from runmap.envs.env import Env
    from runmap.servlet import Servlet


class ReplicaProvider:
    """Acquires, releases and replaces replicas on one cluster.

    Args:
        cluster: where its replicas run.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def acquire(self, like: Remote) -> Remote:
        """``like``'s module placed on a new replica of its env."""
        return self.start(like.servlet.env, like.replicate)

    def start(self, env: Env, place: Callable[[Servlet], Remote]) -> Remote:
        """A new servlet of ``env``'s next replica, with a module ``place``d on it (stopped if that fails)."""
        servlet = self.cluster.start_servlet(self.cluster.replica_env(env))
        try:
            return place(servlet)
        except BaseException:
            self.cluster.stop_servlet(servlet)
            raise

    def replace(self, dead: Remote) -> Remote:
        """A new replica in place of ``dead``, on the same cluster."""
        return self.acquire(dead)

    def release(self, remote: Remote, owned: bool, kill: bool = False) -> None:
        """Gives back a replica the pool is done with.

        A dead servlet is forgotten, not stopped, whoever started it: stopping it
        could overwrite its cause of death (Ray reports an actor killed afterwards
        as "killed by ray.kill", not "its node died"). A live one is ended if the
        Mapper started it (``owned``), or killed at once if ``kill`` (it is stuck).
        """
        servlet = remote.servlet
        if kill:
            servlet.kill()
            self.cluster.forget(servlet)
        elif not servlet.is_alive():
            self.cluster.forget(servlet)
        elif owned:
            self.cluster.stop_servlet(servlet)
