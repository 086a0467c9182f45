"""runmap: the built-in ``map``, over replicas of your code, on this machine or a cluster.

Example:
    >>> import runmap as rm
    >>> with rm.mapper(lambda n: n ** n, num_replicas=3) as m:
    ...     m.map([1, 2, 3, 4], progress=False)
    [1, 4, 27, 256]

Names are imported when first used, not with the package: every servlet
imports ``runmap`` too (``runmap.server`` lives in it), and the client's
machinery (clusters, the Mapper, executors) would add a tenth of a second to
each replica's start-up.
"""

from __future__ import annotations

import importlib
import sys
import types

from runmap._typing import TYPE_CHECKING
from runmap.exceptions import (
    AllocationError,
    AuthError,
    ClusterError,
    ConfigError,
    ProtocolError,
    RemoteError,
    ReplicaDiedError,
    ReplicaError,
    ReplicaTimeoutError,
    RunmapError,
    SerializationError,
)

if TYPE_CHECKING:
    from typing import Any

    from runmap.cluster import Cluster, LocalCluster, cluster
    from runmap.envs import Env, GitRepo, env
    from runmap.executor import Executor
    from runmap.integrations import register_joblib
    from runmap.mapper import Mapper, mapper  # type: ignore[no-redef]
    from runmap.mapper.remote import RemoteMapper
    from runmap.module import (
        Function,
        Module,
        Remote,
        RemoteClass,
        RemoteFunction,
        RemoteInstance,
        RemoteMethod,
        function,
        module,
    )
    from runmap.oneshot import run_map
    from runmap.pool import Pool
del TYPE_CHECKING  # not a name of runmap's

__version__ = "0.1.0"

__all__ = [
    "AllocationError",
    "AuthError",
    "Cluster",
    "ClusterError",
    "ConfigError",
    "Env",
    "Executor",
    "Function",
    "GitRepo",
    "LocalCluster",
    "Mapper",
    "Module",
    "Pool",
    "ProtocolError",
    "Remote",
    "RemoteClass",
    "RemoteError",
    "RemoteFunction",
    "RemoteInstance",
    "RemoteMapper",
    "RemoteMethod",
    "ReplicaDiedError",
    "ReplicaError",
    "ReplicaTimeoutError",
    "RunmapError",
    "SerializationError",
    "cluster",
    "env",
    "function",
    "mapper",
    "module",
    "register_joblib",
    "run_map",
]

# Where each lazily imported name lives.
_LAZY = {
    **dict.fromkeys(("Cluster", "LocalCluster", "cluster"), "runmap.cluster"),
    **dict.fromkeys(("Env", "GitRepo", "env"), "runmap.envs"),
    "Executor": "runmap.executor",
    "register_joblib": "runmap.integrations",
    **dict.fromkeys(("Mapper", "mapper"), "runmap.mapper"),
    **dict.fromkeys(
        ("Function", "Module", "Remote", "RemoteClass", "RemoteFunction", "RemoteInstance", "RemoteMethod",
         "function", "module"),
        "runmap.module",
    ),
    "Pool": "runmap.pool",
    "RemoteMapper": "runmap.mapper.remote",
    "run_map": "runmap.oneshot",
}
# Functions named as a submodule of this package: importing the submodule binds it to
# that name here, so these are data descriptors of the package's class, which win.
_SHADOWED = ("cluster", "mapper", "module")


def _load(name: str) -> Any:
    return getattr(importlib.import_module(_LAZY[name]), name)


class _Package(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name not in _LAZY:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = _load(name)
        self.__dict__[name] = value
        return value

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(__all__))


def _shadowing(name: str) -> property:
    cache: list[Any] = []

    def get(self: types.ModuleType) -> Any:
        if not cache:
            cache.append(_load(name))
        return cache[0]

    def ignore(self: types.ModuleType, value: Any) -> None:
        pass  # the submodule, bound by the import system: the function keeps the name, as it always did

    return property(get, ignore)


for _name in _SHADOWED:
    setattr(_Package, _name, _shadowing(_name))
sys.modules[__name__].__class__ = _Package
