"""runmap: the built-in ``map``, over replicas of your code, on this machine or a cluster.

Example:
    >>> import runmap as rm
    >>> with rm.mapper(lambda n: n ** n, num_replicas=3) as m:
    ...     m.map([1, 2, 3, 4], progress=False)
    [1, 4, 27, 256]
"""

from __future__ import annotations

from runmap.cluster import Cluster, LocalCluster, cluster
from runmap.envs import Env, GitRepo, env
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
from runmap.executor import Executor
from runmap.integrations import register_joblib
from runmap.mapper import Mapper, mapper
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
