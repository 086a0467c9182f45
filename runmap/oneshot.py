"""``rm.run_map``: place a function on a cluster, map it over inputs, return the results: one call.

The general form is ``rm.cluster`` plus ``rm.mapper``; this is the short one, Meadowrun's
``run_map``: one replica per worker of the cluster (an EC2 cluster's ``workers``, else what
the mapper chooses for a plain callable: one per CPU of this machine).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from runmap.cluster.base import Cluster
from runmap.envs.env import Env


def run_map(
    fn: Callable[..., Any], inputs: Iterable[Any], cluster: Cluster, env: Env | None = None, **map_options: Any
) -> list[Any]:
    """Runs ``fn`` on every input on ``cluster``, one replica per worker; the results in input order.

    An EC2 cluster that is not up yet when it is given here is this call's: it is brought up,
    used, and closed when the map ends (terminating what it launched and printing what it
    cost). A cluster already up (``cluster.up()``, or used before) is left open for more work.

    Args:
        fn: the function to run on each input.
        inputs: the inputs (any iterable; read lazily).
        cluster: where to run it (``rm.cluster("ec2", workers=..., ...)``, ``"ssh"``, ``"local"``...).
        env: the env its replicas run in.
        **map_options: the options of :meth:`runmap.Mapper.map` (``progress``, ``chunksize``,
            ``timeout``, ``return_exceptions``, ``checkpoint``, ``kwargs``).

    Returns:
        One result per input, in input order.

    Example:
        >>> import runmap as rm
        >>> rm.run_map(lambda n: n * n, [1, 2, 3], rm.cluster(), progress=False)
        [1, 4, 9]
    """
    from runmap.mapper import mapper

    ours = getattr(cluster, "is_up", True) is False
    try:
        up = getattr(cluster, "up", None)
        if callable(up):
            up()
        workers = getattr(cluster, "workers", None)
        with mapper(fn, cluster=cluster, env=env, num_replicas=workers) as m:
            return list(m.map(inputs, **map_options))
    finally:
        if ours:
            cluster.close()
