"""Where a replica goes on an SSH cluster: packed onto hosts by its env's ``compute``.

Each host reports what it has when it is bootstrapped (CPUs, memory, GPUs).
A replica takes its env's ``compute`` (``{"CPU": 1}`` when the env asks for
nothing, so a host is not given more replicas than it has CPUs) from the first
host, in the order the hosts were given, that still has room for it: hosts are
filled one after the other, as Ray packs actors. A host that is lost takes no
more replicas. A ``compute`` that fits nowhere is an ``AllocationError`` naming
what each host has and has free.

    >>> p = Placement({"a": {"CPU": 2, "memory": 8 * 2**30}, "b": {"CPU": 2}})
    >>> [p.place("r", {"CPU": 1}) for _ in range(3)]
    ['a', 'a', 'b']
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from runmap.exceptions import AllocationError

DEFAULT_COMPUTE = {"CPU": 1.0}


class Placement:
    """The capacity of each host and what the replicas placed there use.

    Args:
        hosts: each host's name and what it has (``CPU``, ``memory`` in bytes, ``GPU``, custom keys).
        default_compute: what a replica whose env asks for nothing takes (an EC2 cluster's: one worker's room).
    """

    def __init__(
        self, hosts: Mapping[str, Mapping[str, float]], default_compute: Mapping[str, float] | None = None
    ) -> None:
        self.default = dict(default_compute or DEFAULT_COMPUTE)
        self.total = {host: dict(resources) for host, resources in hosts.items()}
        self.used: dict[str, dict[str, float]] = {host: {} for host in hosts}
        self.lost: set[str] = set()
        self._lock = threading.Lock()

    def place(self, replica: str, compute: Mapping[str, float]) -> str:
        """Reserves ``compute`` on the first host with room; returns the host."""
        asked = dict(compute) or self.default
        with self._lock:
            for host in self.total:
                if host not in self.lost and self._fits(host, asked):
                    used = self.used[host]
                    for key, amount in asked.items():
                        used[key] = used.get(key, 0.0) + amount
                    return host
            described = "; ".join(self._describe(host) for host in self.total)
        raise AllocationError(
            f"no host can take replica {replica!r} with compute {_format(asked)}: {described}"
        )

    def release(self, host: str, compute: Mapping[str, float]) -> None:
        """Gives back what a replica on ``host`` had reserved."""
        asked = dict(compute) or self.default
        with self._lock:
            used = self.used.get(host)
            if used is None:
                return
            for key, amount in asked.items():
                used[key] = max(0.0, used.get(key, 0.0) - amount)

    def lose(self, host: str) -> None:
        """``host`` is gone: nothing more is placed there."""
        with self._lock:
            self.lost.add(host)

    def _fits(self, host: str, asked: Mapping[str, float]) -> bool:
        total, used = self.total[host], self.used[host]
        return all(
            amount <= 0 or used.get(key, 0.0) + amount <= total.get(key, 0.0) + 1e-9 for key, amount in asked.items()
        )

    def _describe(self, host: str) -> str:
        if host in self.lost:
            return f"{host} is lost"
        total, used = self.total[host], self.used[host]
        free = {key: total[key] - used.get(key, 0.0) for key in total}
        return f"{host} has {_format(total)} ({_format(free)} free)"


def _format(resources: Mapping[str, float]) -> str:
    """``{"CPU": 2, "memory": 8 GiB}`` as ``CPU=2, memory=8.0GB``: memory in GB, never ``8.59e+09``."""
    shown = []
    for key, amount in sorted(resources.items()):
        if key == "memory":
            shown.append(f"memory={amount / 2**30:.1f}GB")
        else:
            shown.append(f"{key}={amount:g}")
    return ", ".join(shown) or "nothing"
