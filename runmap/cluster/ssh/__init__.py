"""The SSH cluster kind: servlets on hosts reached with OpenSSH's own ``ssh`` client.

- :mod:`runmap.cluster.ssh.connection`: :class:`~runmap.cluster.ssh.connection.SSHConnection`,
  one ControlMaster connection per host that every session, forward and file copy goes through,
  and :func:`~runmap.cluster.ssh.connection.classify_exit`, how a remote command ended.
- :mod:`runmap.cluster.ssh.bootstrap`: :func:`~runmap.cluster.ssh.bootstrap.bootstrap`, a host
  prepared once (the client's runmap and pinned dependencies in an env cached on the host).

``SSHCluster`` is imported lazily, so that the connection and bootstrap modules load on their own.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "SSHCluster":
        from runmap.cluster.ssh.cluster import SSHCluster

        return SSHCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
