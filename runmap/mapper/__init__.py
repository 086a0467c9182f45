"""The Mapper: fans inputs out over replicas of a module."""

from __future__ import annotations

from runmap import _template_start

_template_start.warm()  # the servlets' template boots while this client imports the rest, this first

from runmap._typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    from typing import Any

from runmap.mapper.mapper import Mapper  # noqa: E402
from runmap.mapper.run import MapOptions  # noqa: E402


def mapper(target: Any, method: str | None = None, **kwargs: Any) -> Mapper:
    """Builds a :class:`Mapper` over ``target``.

    Args:
        target: a remote instance (with ``method``), a remote method, a remote
            function, or a plain callable (lambda, closure, notebook function),
            which is placed on the embedded local cluster.
        method: the method of a remote instance to map.
        replicas: remote modules to use as further replicas, on any cluster
            (an int is read as ``num_replicas``, Runhouse's spelling).
        num_replicas: the total; the target's own replica counts as one, the
            rest are created by duplicating its env. Defaults to ``os.cpu_count()``
            for a plain callable, else the target plus the supplied replicas.
        concurrency: calls in flight per replica.
        timeout: seconds any one request may take.
        retries: how often an input may be re-run after replicas die under it.
        replace_dead: start a replacement for a replica that dies.
        liveness_timeout: seconds a replica may go without answering a health
            probe (default 30) before it is killed as frozen and its inputs run
            elsewhere; None turns the probe off.
        cluster, env: where a plain callable is placed.
        stream_logs: show what the replicas print on this client's stdout,
            each line prefixed with the replica's name (default True). False
            silences the target's env and its replicas; their log files are kept.

    Example:
        >>> import runmap as rm
        >>> with rm.mapper(lambda n: n ** n, num_replicas=3) as m:
        ...     m.map([1, 2, 3, 4], progress=False)
        [1, 4, 27, 256]
    """
    return Mapper(target, method, **kwargs)


__all__ = ["MapOptions", "Mapper", "mapper"]
