"""Clusters: where servlets are launched. ``rm.cluster()`` is the embedded local one.

``Cluster`` and ``LocalCluster`` are imported when first used, so that a
submodule (:mod:`runmap.cluster.template`, warmed as ``runmap.mapper`` is
imported) comes without the clusters' machinery.
"""

from __future__ import annotations

import importlib
import threading

from runmap._typing import TYPE_CHECKING
from runmap.exceptions import ConfigError

if TYPE_CHECKING:
    from typing import Any

    from runmap.cluster.base import Cluster
    from runmap.cluster.local import LocalCluster

_LAZY = {"Cluster": "runmap.cluster.base", "LocalCluster": "runmap.cluster.local"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


_default: LocalCluster | None = None
_default_lock = threading.Lock()


def default_cluster() -> LocalCluster:
    """The embedded local cluster of this process, started again if it was closed."""
    global _default
    from runmap.cluster.local import LocalCluster

    with _default_lock:
        if _default is None or _default.closed:
            _default = LocalCluster("local")
        return _default


def cluster(kind: str = "local", **options: Any) -> Cluster:
    """A cluster to run servlets on.

    Args:
        kind: ``"local"`` (this machine), ``"ssh"`` (hosts reached with OpenSSH:
            ``hosts=[...]``), ``"ec2"`` (the cheapest EC2 instances for ``workers=``,
            ``cpu=``, ``memory_gb=``: ``pip install runmap[aws]``), or ``"ray"``
            (``pip install runmap[ray]``).
        **options: the kind's own options, such as ``name`` or ``address``.

    With no options, ``rm.cluster()`` is the embedded local cluster that plain
    callables given to :func:`runmap.mapper` run on; with options, a new one.

    Example:
        >>> import runmap as rm
        >>> rm.cluster().kind
        'local'
    """
    if kind == "local":
        from runmap.cluster.local import LocalCluster

        return LocalCluster(**options) if options else default_cluster()
    if kind == "ray":
        from runmap.cluster.ray import RayCluster

        return RayCluster(**options)
    if kind == "ssh":
        from runmap.cluster.ssh.cluster import SSHCluster

        return SSHCluster(**options)
    if kind == "ec2":
        from runmap.cluster.ec2.cluster import EC2Cluster

        return EC2Cluster(**options)
    raise ConfigError(f"unknown cluster kind {kind!r}; expected 'local', 'ssh', 'ec2' or 'ray'")


__all__ = ["Cluster", "LocalCluster", "cluster", "default_cluster"]
