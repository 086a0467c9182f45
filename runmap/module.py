"""Modules: functions and classes placed on a cluster, and the handles that call them.

    >>> import runmap as rm
    >>> def double(x):
    ...     return 2 * x
    >>> remote_double = rm.function(double).to(rm.cluster())
    >>> remote_double(21)
    42

A function travels by reference when the servlet can import it and by value
(cloudpickle) when it was defined in ``__main__``, a notebook, or is a lambda or
closure. A class travels once; calling the remote class builds an instance in
the servlet, and attribute access on that instance gives remote methods.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from runmap import serialization as ser
from runmap.envs.env import Env
from runmap.exceptions import ClusterError, ConfigError, ReplicaDiedError
from runmap.server.state import CLASS, FUNCTION

if TYPE_CHECKING:
    from runmap.cluster.base import Cluster
    from runmap.servlet import Servlet
    from runmap.transport.base import Channel

_ids = itertools.count(1)
_ids_lock = threading.Lock()


def _module_name(obj: Any) -> str:
    with _ids_lock:
        n = next(_ids)
    if isinstance(obj, str):  # "package.module:name"
        base = obj.rpartition(":")[2]
    else:
        base = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return f"{base.replace('<', '').replace('>', '').replace('/', '_')}-{n}"


def _resolve_cluster(cluster: Cluster | None) -> Cluster:
    if cluster is None:
        from runmap.cluster import default_cluster

        return default_cluster()
    return cluster


@contextlib.contextmanager
def _reaching(servlet: Servlet) -> Iterator[Channel]:
    """This thread's channel to ``servlet``; a closed cluster is said to be closed.

    A servlet ends with its cluster, so reaching it then would only say that
    the connection was refused.
    """
    if servlet.cluster.closed:
        raise _closed(servlet)
    try:
        yield servlet.channel()
    except ReplicaDiedError as exc:
        if servlet.cluster.closed:  # closed while the call was under way
            raise _closed(servlet) from exc
        raise


def _closed(servlet: Servlet) -> ClusterError:
    return ClusterError(f"cluster {servlet.cluster.name!r} is closed: replica {servlet.name!r} ended with it")


def _single_call(
    servlet: Servlet,
    module: str,
    method: str | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    in_thread: bool = False,
) -> Any:
    """One call on this thread's connection to ``servlet``; ``in_thread``: never on its event loop."""
    payload = ser.dump_call(ser.STAR, [args], kwargs)
    with _reaching(servlet) as channel:
        outcome = ser.load_outcome(channel.call(module, method, payload, in_thread=in_thread))
    if outcome.errors:
        raise outcome.errors[0].to_exception(None, servlet.name)
    return outcome.results[0]


class Remote:
    """A module placed on a servlet. Mapper replicas are instances of this.

    Attributes:
        servlet: the servlet it lives in.
        module_name: its name there (the same on every replica).
    """

    def __init__(self, servlet: Servlet, module_name: str, spec: bytes) -> None:
        self.servlet = servlet
        self.module_name = module_name
        self._spec = spec

    @classmethod
    def place(cls, servlet: Servlet, module_name: str, spec: bytes) -> Remote:
        with _reaching(servlet) as channel:
            outcome = ser.load_outcome(channel.put_module(module_name, spec))
        if outcome.errors:
            raise outcome.errors[0].to_exception(None, servlet.name)
        return cls(servlet, module_name, spec)

    def replicate(self, servlet: Servlet) -> Remote:
        """The same module, placed on another servlet (a class is instantiated anew there)."""
        return type(self).place(servlet, self.module_name, self._spec)

    @property
    def name(self) -> str:
        """The replica's name: its servlet's."""
        return self.servlet.name

    def remove(self) -> None:
        """Drops the module from its servlet."""
        with _reaching(self.servlet) as channel:
            channel.delete_module(self.module_name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.module_name} on {self.servlet.name}>"


class RemoteFunction(Remote):
    """A function placed on a servlet; call it like the local one."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _single_call(self.servlet, self.module_name, None, args, kwargs)


class RemoteInstance(Remote):
    """An instance of a remote class; its attributes are :class:`RemoteMethod`\\ s."""

    def __getattr__(self, name: str) -> RemoteMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return RemoteMethod(self, name)


class RemoteMethod:
    """A method of a remote instance; call it like the local one."""

    def __init__(self, instance: RemoteInstance, name: str) -> None:
        self.instance = instance
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _single_call(self.instance.servlet, self.instance.module_name, self.name, args, kwargs)

    def __repr__(self) -> str:
        return f"<RemoteMethod {self.name} of {self.instance!r}>"


class RemoteClass:
    """A class shipped to a servlet; calling it builds an instance there."""

    def __init__(self, cls: type | str, servlet: Servlet) -> None:
        self.cls = cls  # a class, or "package.module:ClassName" imported in the replica
        self.servlet = servlet

    def __call__(self, *args: Any, **kwargs: Any) -> RemoteInstance:
        spec = ser.dump_module((CLASS, self.cls, args, kwargs), self.servlet.cluster.remote_files)
        return RemoteInstance.place(self.servlet, _module_name(self.cls), spec)  # type: ignore[return-value]

    def __repr__(self) -> str:
        name = self.cls if isinstance(self.cls, str) else self.cls.__qualname__
        return f"<RemoteClass {name} on {self.servlet.name}>"


class Function:
    """A function not yet placed anywhere. ``.to(cluster, env)`` places it."""

    def __init__(self, fn: Callable[..., Any] | str) -> None:
        if isinstance(fn, str):
            check_import_path(fn, "rm.function")
        elif not callable(fn):
            raise ConfigError(f"rm.function takes a callable or 'package.module:name', not {type(fn).__name__}")
        self.fn = fn

    def to(self, cluster: Cluster | None = None, env: Env | None = None) -> RemoteFunction:
        """Places the function in ``env``'s servlet on ``cluster`` (started if need be)."""
        where = _resolve_cluster(cluster)
        place = self.placer(where)  # before starting: pickling may fail
        return place(where.servlet(env))

    def placer(self, cluster: Cluster) -> Callable[[Servlet], RemoteFunction]:
        """What places the function on a servlet of ``cluster``: pickled once, now, for every servlet."""
        spec = ser.dump_module((FUNCTION, self.fn, (), {}), cluster.remote_files)
        name = _module_name(self.fn)
        return lambda servlet: RemoteFunction.place(servlet, name, spec)  # type: ignore[return-value]


class Module:
    """A class not yet placed anywhere. ``.to(cluster, env)`` gives a :class:`RemoteClass`."""

    def __init__(self, cls: type | str) -> None:
        if isinstance(cls, str):
            check_import_path(cls, "rm.module")
        elif not isinstance(cls, type):
            raise ConfigError(f"rm.module takes a class or 'package.module:ClassName', not {type(cls).__name__}")
        self.cls = cls

    def to(self, cluster: Cluster | None = None, env: Env | None = None) -> RemoteClass:
        """Ships the class to ``env``'s servlet on ``cluster``; call the result to build an instance."""
        return RemoteClass(self.cls, _resolve_cluster(cluster).servlet(env))


def check_import_path(spec: str, what: str) -> None:
    """``spec`` is ``"package.module:name"`` (a dotted name after the colon is an attribute path)."""
    mod, colon, attr = spec.partition(":")
    if not colon or not all(p.isidentifier() for p in mod.split(".")) or not all(
        p.isidentifier() for p in attr.split(".")
    ):
        raise ConfigError(f"{what} takes 'package.module:name' as a string, not {spec!r}")


def function(fn: Callable[..., Any] | str) -> Function:
    """Wraps a function so it can be placed on a cluster.

    ``fn`` may be a string, ``"package.module:name"``: the function is imported inside the
    replica, for code only the env has (a git repository's, or an env requirement's).

    Example:
        >>> import runmap as rm
        >>> square = rm.function(lambda x: x * x).to(rm.cluster())
        >>> square(7)
        49
    """
    return Function(fn)


def module(cls: type | str) -> Module:
    """Wraps a class so it can be placed on a cluster.

    ``cls`` may be a string, ``"package.module:ClassName"``, imported inside the replica.

    Example:
        >>> import runmap as rm
        >>> class Counter:
        ...     def __init__(self, start):
        ...         self.n = start
        ...     def add(self, k):
        ...         self.n += k
        ...         return self.n
        >>> counter = rm.module(Counter).to(rm.cluster())(start=10)
        >>> counter.add(5)
        15
    """
    return Module(cls)
