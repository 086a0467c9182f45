"""The Mapper: the built-in ``map``, over many replicas of a module.

    Mapper ── holds the replicas (the target's own, supplied ones, ones it
      │       creates by duplicating the target's env) and replaces dead ones
      │
      ├── MapRun (run.py): one map's input window, chunks and ordered results
      │
      └── ReplicaPool (pool.py): shared TaskQueue ─► dispatch thread (dispatch.py) ─► servlets

The Mapper knows nothing of how a map's results are ordered, and a map knows
nothing of how replicas are started or replaced: each piece can be tested alone.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from runmap import _threads, logs, registry
from runmap import serialization as ser
from runmap.cluster.base import Cluster
from runmap.envs.env import Env
from runmap.exceptions import ConfigError, RunmapError
from runmap.mapper.liveness import DEFAULT_LIVENESS_TIMEOUT
from runmap.mapper.pool import Replica, ReplicaPool
from runmap.mapper.provider import ReplicaProvider
from runmap.mapper.run import MapRun, check_timeout, input_len, parse_options, zip_inputs
from runmap.mapper.targets import resolve_target
from runmap.mapper.tasks import FutureSink, Task
from runmap.module import Function, Module, Remote, RemoteClass, RemoteInstance, RemoteMethod
from runmap.server.state import FUNCTION

if TYPE_CHECKING:
    from runmap.mapper.batching import Pace
    from runmap.mapper.remote import RemoteMapper
    from runmap.servlet import Servlet

_open_mappers: weakref.WeakSet[Mapper] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Registered after the clusters' hook, so it runs before it: mappers first.
    for mapper in list(_open_mappers):
        mapper.close()
class Mapper:
    """Maps a module's method over many replicas, in parallel.

    Build one with :func:`runmap.mapper`. Use it as a context manager, or call
    :meth:`close`: the replicas it created end with it.

    Example:
        >>> import runmap as rm
        >>> with rm.mapper(lambda n: n ** n, num_replicas=2) as m:
        ...     m.map([1, 2, 3, 4], progress=False)
        [1, 4, 27, 256]
    """

    def __init__(
        self,
        target: Any,
        method: str | None = None,
        *,
        replicas: list[Remote | RemoteMethod] | int | None = None,
        num_replicas: int | None = None,
        concurrency: int = 1,
        timeout: float | None = None,
        retries: int = 3,
        retry_exceptions: bool | type[BaseException] | tuple[type[BaseException], ...] = False,
        replace_dead: bool = True,
        liveness_timeout: float | None = DEFAULT_LIVENESS_TIMEOUT,
        cluster: Cluster | None = None,
        env: Env | None = None,
        stream_logs: bool = True,
    ) -> None:
        if isinstance(replicas, int) and not isinstance(replicas, bool):
            if num_replicas is not None and num_replicas != replicas:
                raise ConfigError("replicas=<int> is num_replicas; give one of them")
            num_replicas, replicas = replicas, None
        mapped = target.name if isinstance(target, RemoteMethod) else method
        given = [] if replicas is None or isinstance(replicas, int) else list(replicas)
        supplied = [_as_replica(r, mapped) for r in given]
        _check_positive("concurrency", concurrency)
        check_timeout(timeout)
        if num_replicas is not None:
            _check_positive("num_replicas", num_replicas)
        if liveness_timeout is not None and not (
            isinstance(liveness_timeout, (int, float)) and not isinstance(liveness_timeout, bool)
            and liveness_timeout > 0
        ):
            raise ConfigError(f"liveness_timeout must be a number of seconds > 0, or None, not {liveness_timeout!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be an int >= 0, not {retries!r}")
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.retry_exceptions = _retryable(retry_exceptions)
        self._retry_spec = retry_exceptions
        self.replace_dead = replace_dead
        self.liveness_timeout = liveness_timeout
        self.method = mapped if isinstance(target, (RemoteMethod, RemoteInstance)) else None
        self._closed = False
        self._lock = threading.Lock()
        self._helpers: list[threading.Thread] = []
        self._early: list[Future[Any]] = []  # replicas' servlets started alongside the target's own
        self.replaced = 0  # dead replicas a replacement was started for, for the progress bar
        self.pace: Pace | None = None  # seconds and bytes per input of the last map with adaptive chunks
        # What to start, kept until first use: a Mapper placed elsewhere (:meth:`to`) starts nothing here.
        self._target, self._method_arg, self._cluster, self._env = target, method, cluster, env
        self._supplied, self._num_replicas, self._stream_logs = supplied, num_replicas, stream_logs
        self._started = False
        self._start_lock = threading.RLock()
        self._start_error: BaseException | None = None
        check_travels(target, cluster)  # a callable that cannot travel fails here, before anything starts
        _open_mappers.add(self)

    def to(self, cluster: Cluster, env: Env | None = None, lease: float = 5.0) -> RemoteMapper:
        """Runs this Mapper on ``cluster`` instead of here, and returns a handle with its methods.

        The Mapper then starts its replicas there, as a Mapper on the cluster would
        be placed, and calls between it and its replicas stay inside the cluster: this
        client only streams inputs up and results back. Only a Mapper not yet used
        can move, over a function (a callable, or ``rm.function``) it places itself.

        Args:
            cluster: where the Mapper and its replicas run.
            env: the replicas' env (default: the one given to ``rm.mapper``).
            lease: seconds the Mapper waits without hearing from this client (it
                sends a heartbeat every second) before it cancels its maps and ends
                its replicas. A client process that dies takes the Mapper's servlet
                with it at once.

        Example:
            >>> import runmap as rm
            >>> with rm.mapper(lambda n: n ** n, num_replicas=2).to(rm.cluster()) as m:
            ...     m.map([1, 2, 3, 4], progress=False)
            [1, 4, 27, 256]
        """
        from runmap.mapper.remote import RemoteMapper

        with self._start_lock:
            if self._started or self._closed:
                raise ConfigError("only a Mapper not yet used can be placed on a cluster: call .to() first")
            if self._supplied or isinstance(self._target, (Remote, RemoteMethod, RemoteClass, Module)):
                raise ConfigError(
                    "a Mapper placed on a cluster starts its own replicas there: give it the function "
                    "(a callable, or rm.function(...)), not replicas that run elsewhere"
                )
            self._closed = True  # this handle is spent: the Mapper lives on the cluster now
        _open_mappers.discard(self)
        options = {
            "num_replicas": self._num_replicas,
            "concurrency": self.concurrency,
            "timeout": self.timeout,
            "retries": self.retries,
            "retry_exceptions": self._retry_spec,
            "replace_dead": self.replace_dead,
            "liveness_timeout": self.liveness_timeout,
            "stream_logs": self._stream_logs,
        }
        name = _describe_target(self._target, self._method_arg)
        return RemoteMapper(
            cluster, self._target, self._method_arg, options, env or self._env, name, self.concurrency, lease
        )

    def start(self) -> Mapper:
        """Places the target and starts the replicas now; otherwise the first use does. Returns the Mapper."""
        self._ensure_started()
        return self

    def _ensure_started(self) -> None:
        """Places the target and starts the replicas, once, on first use of the Mapper."""
        if self._started:
            return
        with self._start_lock:
            if self._start_error is not None:
                raise self._start_error
            if self._started:
                return
            self._check_open()
            try:
                with registry.batch():  # each replica's start would write the cluster's entry again
                    self._start_replicas()
            except BaseException as exc:
                self._start_error = exc
                self.close()
                raise
            self._started = True

    def _start_replicas(self) -> None:
        supplied, num_replicas = self._supplied, self._num_replicas
        plain_total = num_replicas or os.cpu_count() or 1  # the total if target is a plain callable
        extra = plain_total - 1 - len(supplied)
        try:
            # Only a plain callable is placed here, and only then do its replicas start early.
            remote, self.method, owned, plain = resolve_target(
                self._target,
                self._method_arg,
                self._cluster,
                self._env,
                lambda where, placed, place: self._start_early(where, placed, place, extra),
            )
        except BaseException:
            self._stop_early()
            raise
        self._prototype = remote
        if not self._stream_logs:
            logs.silence(remote, *supplied)
        if num_replicas is None:
            num_replicas = plain_total if plain else 1 + len(supplied)
        self._pool = ReplicaPool(self.method, self.concurrency, self.retries, self._on_lost, self.liveness_timeout)
        self._pool.add(remote, owned)
        for r in supplied:
            self._pool.add(r, owned=False)
        self._add_created(num_replicas - 1 - len(supplied))

    # -------------------------------------------------------------- replicas

    @property
    def replicas(self) -> list[Remote]:
        """The replicas in rotation now."""
        self._ensure_started()
        return [r.remote for r in self._pool.alive]

    @property
    def num_replicas(self) -> int:
        self._ensure_started()
        return len(self._pool.alive)

    def add_replicas(self, n_or_list: int | list[Remote | RemoteMethod]) -> list[Remote]:
        """Adds ``n`` replicas made by duplicating the target's env, or the given remote modules (or methods)."""
        self._check_open()
        self._ensure_started()
        if isinstance(n_or_list, int):
            return self._add_created(n_or_list)
        supplied = [_as_replica(r, self.method) for r in n_or_list]
        for remote in supplied:
            self._pool.add(remote, owned=False)
        return supplied

    def _add_created(self, n: int) -> list[Remote]:
        """Starts ``n`` replicas by duplicating the target's env, in parallel."""
        if n <= 0:
            return []
        started = _threads.outcomes(lambda _: self._create_replica(), range(n), "runmap-start", max_threads=8)
        created = [r for r in started if not isinstance(r, BaseException)]
        for remote in created:
            self._pool.add(remote, owned=True)
        error = _threads.first_error(started)
        if error is not None:
            raise error
        return created

    def _start_early(self, cluster: Cluster, env: Env, place: Callable[[Servlet], Remote], n: int) -> None:
        """Starts ``n`` replicas, and places the target on them, while the target's own servlet starts."""
        if n <= 0:
            return
        provider = ReplicaProvider(cluster)
        starter = ThreadPoolExecutor(max_workers=min(8, n), thread_name_prefix="runmap-start")
        self._early = [starter.submit(provider.start, env, place) for _ in range(n)]
        starter.shutdown(wait=False)

    def _stop_early(self) -> None:
        """Stops the servlets started early that no replica took."""
        with self._lock:
            early, self._early = self._early, []
        for future in early:
            try:
                servlet = future.result().servlet
            except BaseException:
                continue
            servlet.cluster.stop_servlet(servlet)

    def _create_replica(self) -> Remote:
        with self._lock:
            early = self._early.pop(0) if self._early else None
        if early is not None:
            return early.result()  # placed already
        return ReplicaProvider(self._prototype.servlet.cluster).acquire(self._prototype)

    def _on_lost(self, replica: Replica) -> bool:
        """Starts a replacement for a dead replica; says whether one is coming."""
        if not self.replace_dead or self._closed or replica.remote.servlet.cluster.closed:
            return False
        self._pool.expect_replacements(1)
        self.replaced += 1

        def replace() -> None:
            try:
                remote = replica.provider.replace(replica.remote)
                try:
                    self._pool.add(remote, owned=True)
                except BaseException:
                    replica.provider.release(remote, owned=True)
                    raise
            except BaseException as exc:
                self._pool.replacement_failed(f"replacement failed: {exc}")
            else:
                self._pool.replacement_done()

        thread = threading.Thread(target=replace, name=f"runmap-replace-{replica.name}", daemon=True)
        with self._lock:  # started under the lock: a close() that sees it may join it
            self._helpers.append(thread)
            thread.start()
        return True

    # ------------------------------------------------------------------ maps

    def map(self, *iterables: Iterable[Any], **options: Any) -> list[Any]:
        """Like the built-in ``map``: one result per input, in input order.

        Several iterables are zipped, stopping at the shortest.

        Args:
            *iterables: the inputs.
            progress: show a ``tqdm`` bar (default True).
            chunksize: inputs per request, or ``"auto"`` (default) to adapt.
            return_exceptions: put a failed input's exception in its slot
                instead of raising it.
            kwargs: keyword arguments passed to every call.
            timeout: seconds any one request may take.
            checkpoint: a file path: save each result as it arrives, and on a
                later run of the same map skip the inputs already saved.
        """
        return _collect(self._start(*zip_inputs(iterables), options, ordered=True))

    def starmap(self, iterable: Iterable[Iterable[Any]], **options: Any) -> list[Any]:
        """Like ``itertools.starmap``: each input is a tuple of arguments."""
        stars = (tuple(a) for a in iterable)
        return _collect(self._start(ser.STAR, stars, input_len(iterable), options, ordered=True))

    def imap(self, *iterables: Iterable[Any], **options: Any) -> Iterator[Any]:
        """Results in input order, as they become available; inputs are read lazily."""
        return self._start(*zip_inputs(iterables), options, ordered=True).results()

    def imap_unordered(self, *iterables: Iterable[Any], **options: Any) -> Iterator[Any]:
        """Results as they complete, in any order."""
        return self._start(*zip_inputs(iterables), options, ordered=False).results()

    async def amap(self, *iterables: Iterable[Any], **options: Any) -> list[Any]:
        """``await`` form of :meth:`map`, for asyncio code and notebooks' top-level await."""
        from runmap.mapper import aio

        return await aio.amap(self, *iterables, **options)

    def aimap(self, *iterables: Iterable[Any], **options: Any) -> AsyncIterator[Any]:
        """``async for`` form of :meth:`imap`; cancelling the task stops the map."""
        from runmap.mapper import aio

        return aio.aimap(self, *iterables, **options)

    def aimap_unordered(self, *iterables: Iterable[Any], **options: Any) -> AsyncIterator[Any]:
        """``async for`` form of :meth:`imap_unordered`: results as they complete; cancelling stops the map."""
        from runmap.mapper import aio

        return aio.aimap_unordered(self, *iterables, **options)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """One call on the next free replica."""
        return self.submit(*args, **kwargs).result()

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """One call on the next free replica, as a :class:`concurrent.futures.Future`."""
        self._check_open()
        self._ensure_started()
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        task = Task(0, ser.STAR, [args], kwargs, FutureSink(future), self.timeout)
        task.serialized()  # arguments that can't be pickled raise here, in the caller's thread
        self._pool.submit(task)
        return future

    def _start(
        self, mode: int, items: Iterator[Any], total: int | None, options: dict[str, Any], ordered: bool
    ) -> MapRun:
        """A map of ``items``, not yet started: it runs as its ``results()`` are read."""
        opts = parse_options(options)
        self._check_open()
        self._ensure_started()
        return MapRun(self, mode, items, total, opts, ordered)

    # --------------------------------------------------------------- closing

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stops dispatching and ends the replicas this Mapper created. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            helpers = list(self._helpers)
        _open_mappers.discard(self)
        with self._start_lock:  # a start under way finishes first, so that its replicas end here
            started = self._started or hasattr(self, "_pool")
        if started:
            self._pool.close()
            for thread in helpers:
                thread.join(10)
            self._pool.release_owned()
        self._stop_early()

    def _check_open(self) -> None:
        if self._closed:
            raise RunmapError("this Mapper is closed")

    def __enter__(self) -> Mapper:
        self._ensure_started()  # errors of starting belong to the `with` line
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        if not self._started:
            return f"<Mapper of {self._target!r}, not started>"
        return f"<Mapper {self._prototype.module_name}.{self.method or '__call__'} replicas={len(self._pool.alive)}>"


def _describe_target(target: Any, method: str | None) -> str:
    fn = target.fn if isinstance(target, Function) else target
    name = fn.rpartition(":")[2] if isinstance(fn, str) else getattr(fn, "__name__", type(fn).__name__)
    name = name.replace("<", "").replace(">", "") or "fn"
    return f"{name}.{method}" if method else name


def check_travels(target: Any, cluster: Cluster | None) -> None:
    """A plain callable that cannot be pickled fails when the Mapper is built, before anything starts."""
    if isinstance(target, (Remote, RemoteMethod, RemoteClass, Module)):
        return  # placed already, or refused with its own message on first use
    fn = target.fn if isinstance(target, Function) else target
    if isinstance(fn, str) or not callable(fn):
        return  # imported in the replica, or refused with its own message on first use
    ser.dump_module((FUNCTION, fn, (), {}), cluster.remote_files if cluster is not None else False)


def _as_replica(replica: Any, method: str | None) -> Remote:
    """A replica given in ``replicas=[...]``: a remote module, or a remote method of the one mapped."""
    if isinstance(replica, RemoteMethod):
        if replica.name != method:
            mapped = repr(method) if method else "a function"
            raise ConfigError(
                f"a replica was given as its method {replica.name!r} ({replica!r}), but this Mapper maps {mapped}"
            )
        return replica.instance
    if not isinstance(replica, Remote):
        raise ConfigError(
            f"replicas must be remote modules or remote methods (from .to()), not {type(replica).__name__}"
        )
    return replica


def _retryable(
    spec: bool | type[BaseException] | tuple[type[BaseException], ...],
) -> tuple[type[BaseException], ...]:
    """``retry_exceptions`` as a tuple for ``isinstance``: empty for False, Exception for True."""
    if spec is True:
        return (Exception,)
    if spec is False or spec is None:
        return ()
    kinds = spec if isinstance(spec, tuple) else (spec,)
    for kind in kinds:
        if not (isinstance(kind, type) and issubclass(kind, BaseException)):
            raise ConfigError(f"retry_exceptions takes True, False or exception types, not {kind!r}")
    return kinds


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, not {value!r}")


def _collect(run: MapRun) -> list[Any]:
    """Every result of ``run`` in a list, a chunk at a time."""
    out: list[Any] = []
    chunks = run.result_chunks()
    try:
        for chunk in chunks:
            out += chunk
    finally:
        chunks.close()
    return out
