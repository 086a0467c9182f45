"""What a Mapper maps over: a remote module and a method, whatever the user handed it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runmap.cluster.base import Cluster
from runmap.envs.env import Env
from runmap.exceptions import ConfigError
from runmap.module import Function, Module, Remote, RemoteClass, RemoteFunction, RemoteInstance, RemoteMethod

if TYPE_CHECKING:
    from runmap.servlet import Servlet


def resolve_target(
    target: Any,
    method: str | None,
    cluster: Cluster | None,
    env: Env | None,
    on_placing: Callable[[Cluster, Env, Callable[[Servlet], Remote]], None] | None = None,
) -> tuple[Remote, str | None, bool, bool]:
    """(remote module, method, whether the Mapper owns its servlet, whether it was a plain callable)."""
    if isinstance(target, RemoteMethod):
        if method not in (None, target.name):
            raise ConfigError(f"target is the method {target.name!r}; method={method!r} contradicts it")
        return target.instance, target.name, False, False
    if isinstance(target, RemoteInstance):
        if not method:
            raise ConfigError("a remote instance needs method=, the name of the method to map")
        return target, method, False, False
    if isinstance(target, RemoteFunction):
        return target, None, False, False
    if isinstance(target, (Module, RemoteClass)):
        what = target.cls if isinstance(target.cls, str) else target.cls.__qualname__
        raise ConfigError(
            f"cannot map over the class {what}: map a method of an instance, e.g. "
            f"rm.mapper(rm.module(...).to(cluster, env=env)(*init_args).method)"
        )
    fn = target.fn if isinstance(target, Function) else target
    if isinstance(target, Function) and isinstance(fn, str):  # "package.module:name", imported in the replica
        if method is not None:
            fn = f"{fn}.{method}"
    elif not callable(fn):
        raise ConfigError(f"cannot map over {type(target).__name__}: it is not callable")
    elif method is not None:
        fn = getattr(fn, method)
    from runmap.cluster import default_cluster

    where = cluster or default_cluster()
    base = env or Env(name=_env_name(fn))
    placed_env = where.unique_env(base)
    place = Function(fn).placer(where)  # before any servlet starts: pickling may fail
    if on_placing is not None:
        on_placing(where, placed_env, place)
    return place(where.servlet(placed_env)), None, True, True


def _env_name(fn: Callable[..., Any] | str) -> str:
    if isinstance(fn, str):  # "package.module:name.attr": "attr"
        name = fn.rpartition(":")[2].rpartition(".")[2]
    else:
        name = getattr(fn, "__name__", "") or type(fn).__name__
    name = re.sub(r"[^A-Za-z0-9_.-]", "", name) or "fn"
    return "lambda" if name == "lambda" else name
