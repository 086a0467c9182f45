"""The Mapper: the built-in ``map``, over many replicas of a module.

    Mapper.imap ── input window ── chunks (serialized here, so a bad argument is
        │            (bounded)       named before anything is sent)
        │                              │
        │                              ▼
        │                   ReplicaPool: shared TaskQueue ─► slot threads ─► servlets
        │                              │
        ▼                              ▼
    results in input order ◄── Sink (one per map) ◄── outcomes / failures

The map loop runs in the caller's thread: it pulls inputs lazily, keeps at
most ``2 × slots`` chunks in flight, and yields results as the chunk holding
the next index completes (or, unordered, as any chunk completes).
"""

from __future__ import annotations

import atexit
import os
import queue
import re
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

from runmap import logs
from runmap import serialization as ser
from runmap.cluster.base import Cluster
from runmap.envs.env import Env
from runmap.exceptions import ConfigError, RunmapError, SerializationError
from runmap.mapper.batching import chunker
from runmap.mapper.checkpoint import MISSING, Checkpoint
from runmap.mapper.pool import Replica, ReplicaPool
from runmap.mapper.progress import Progress
from runmap.mapper.tasks import SPLIT, FutureSink, Sink, Task
from runmap.module import Function, Module, Remote, RemoteClass, RemoteFunction, RemoteInstance, RemoteMethod

_open_mappers: weakref.WeakSet[Mapper] = weakref.WeakSet()
POLL_SECONDS = 0.5
READ_AHEAD = 16  # chunks a slot that may be read before the oldest is yielded


@atexit.register
def _close_all() -> None:
    # Registered after the clusters' hook, so it runs before it: mappers first.
    for mapper in list(_open_mappers):
        mapper.close()


@dataclass(frozen=True)
class MapOptions:
    """Options of one map; keyword-only, so they never collide with the user's arguments."""

    progress: bool = True
    chunksize: int | str = "auto"
    return_exceptions: bool = False
    kwargs: dict[str, Any] | None = None
    timeout: float | None = None
    checkpoint: str | os.PathLike[str] | None = None


_OPTION_NAMES = frozenset(MapOptions.__dataclass_fields__)


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
        replicas: list[Remote] | int | None = None,
        num_replicas: int | None = None,
        concurrency: int = 1,
        timeout: float | None = None,
        retries: int = 3,
        retry_exceptions: bool | type[BaseException] | tuple[type[BaseException], ...] = False,
        replace_dead: bool = True,
        cluster: Cluster | None = None,
        env: Env | None = None,
        stream_logs: bool = True,
    ) -> None:
        if isinstance(replicas, int) and not isinstance(replicas, bool):
            if num_replicas is not None and num_replicas != replicas:
                raise ConfigError("replicas=<int> is num_replicas; give one of them")
            num_replicas, replicas = replicas, None
        supplied: list[Remote] = [] if replicas is None or isinstance(replicas, int) else list(replicas)
        for r in supplied:
            if not isinstance(r, Remote):
                raise ConfigError(f"replicas must be remote modules (from .to()), not {type(r).__name__}")
        _check_positive("concurrency", concurrency)
        if num_replicas is not None:
            _check_positive("num_replicas", num_replicas)
        if not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be an int >= 0, not {retries!r}")
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.retry_exceptions = _retryable(retry_exceptions)
        self.replace_dead = replace_dead
        self._closed = False
        self._lock = threading.Lock()
        self._helpers: list[threading.Thread] = []
        self._early: list[Future[Any]] = []  # replicas' servlets started alongside the target's own

        extra = (num_replicas or os.cpu_count() or 1) - 1 - len(supplied)
        try:
            remote, self.method, owned, plain = _resolve_target(
                target, method, cluster, env, lambda where, placed: self._start_early(where, placed, extra)
            )
        except BaseException:
            self._stop_early()
            raise
        self._prototype = remote
        if not stream_logs:
            logs.silence(remote, *supplied)
        if num_replicas is None:
            num_replicas = (os.cpu_count() or 1) if plain else 1 + len(supplied)
        self._pool = ReplicaPool(self.method, concurrency, retries, self._on_lost)
        _open_mappers.add(self)
        try:
            self._pool.add(remote, owned)
            for r in supplied:
                self._pool.add(r, owned=False)
            self.add_replicas(num_replicas - 1 - len(supplied))
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- replicas

    @property
    def replicas(self) -> list[Remote]:
        """The replicas in rotation now."""
        return [r.remote for r in self._pool.alive]

    @property
    def num_replicas(self) -> int:
        return len(self._pool.alive)

    def add_replicas(self, n_or_list: int | list[Remote]) -> list[Remote]:
        """Adds ``n`` replicas made by duplicating the target's env, or the given remote modules."""
        self._check_open()
        if isinstance(n_or_list, int):
            if n_or_list <= 0:
                return []
            with ThreadPoolExecutor(max_workers=min(8, n_or_list), thread_name_prefix="runmap-start") as ex:
                futures = [ex.submit(self._create_replica) for _ in range(n_or_list)]
            created = [f.result() for f in futures if f.exception() is None]
            for remote in created:
                self._pool.add(remote, owned=True)
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise errors[0]  # type: ignore[misc]
            return created
        for r in n_or_list:
            if not isinstance(r, Remote):
                raise ConfigError(f"replicas must be remote modules (from .to()), not {type(r).__name__}")
            self._pool.add(r, owned=False)
        return list(n_or_list)

    def _start_early(self, cluster: Cluster, env: Env, n: int) -> None:
        """Starts ``n`` replicas' servlets while the target's own starts: in parallel, not after it."""
        if n <= 0:
            return
        starter = ThreadPoolExecutor(max_workers=min(8, n), thread_name_prefix="runmap-start")
        self._early = [starter.submit(cluster.start_servlet, cluster.replica_env(env)) for _ in range(n)]
        starter.shutdown(wait=False)

    def _stop_early(self) -> None:
        """Stops the servlets started early that no replica took."""
        with self._lock:
            early, self._early = self._early, []
        for future in early:
            try:
                servlet = future.result()
            except BaseException:
                continue
            servlet.cluster.stop_servlet(servlet)

    def _create_replica(self) -> Remote:
        servlet0 = self._prototype.servlet
        cluster = servlet0.cluster
        with self._lock:
            early = self._early.pop(0) if self._early else None
        if early is not None:
            servlet = early.result()
        else:
            servlet = cluster.start_servlet(cluster.replica_env(servlet0.env))
        try:
            return self._prototype.replicate(servlet)
        except BaseException:
            cluster.stop_servlet(servlet)
            raise

    def _on_lost(self, replica: Replica) -> bool:
        """Starts a replacement for a dead replica; says whether one is coming."""
        if not self.replace_dead or self._closed or replica.remote.servlet.cluster.closed:
            return False
        self._pool.expect_replacements(1)

        def replace() -> None:
            try:
                servlet = replica.remote.servlet
                cluster = servlet.cluster
                new = cluster.start_servlet(cluster.replica_env(servlet.env))
                try:
                    remote = replica.remote.replicate(new)
                    self._pool.add(remote, owned=True)
                except BaseException:
                    cluster.stop_servlet(new)
                    raise
            except BaseException as exc:
                self._pool.replacement_failed(f"replacement failed: {exc}")
            else:
                self._pool.replacement_done()

        thread = threading.Thread(target=replace, name=f"runmap-replace-{replica.name}", daemon=True)
        with self._lock:
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
        return list(self.imap(*iterables, **options))

    def starmap(self, iterable: Iterable[Iterable[Any]], **options: Any) -> list[Any]:
        """Like ``itertools.starmap``: each input is a tuple of arguments."""
        opts = _options(options)
        return list(self._run(ser.STAR, (tuple(a) for a in iterable), _len(iterable), opts, ordered=True))

    def imap(self, *iterables: Iterable[Any], **options: Any) -> Iterator[Any]:
        """Results in input order, as they become available; inputs are read lazily."""
        mode, items, total = _zip(iterables)
        return self._run(mode, items, total, _options(options), ordered=True)

    def imap_unordered(self, *iterables: Iterable[Any], **options: Any) -> Iterator[Any]:
        """Results as they complete, in any order."""
        mode, items, total = _zip(iterables)
        return self._run(mode, items, total, _options(options), ordered=False)

    async def amap(self, *iterables: Iterable[Any], **options: Any) -> list[Any]:
        """``await`` form of :meth:`map`, for asyncio code and notebooks' top-level await."""
        from runmap.mapper import aio

        return await aio.amap(self, *iterables, **options)

    def aimap(self, *iterables: Iterable[Any], **options: Any) -> AsyncIterator[Any]:
        """``async for`` form of :meth:`imap`; cancelling the task stops the map."""
        from runmap.mapper import aio

        return aio.aimap(self, *iterables, **options)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """One call on the next free replica."""
        return self.submit(*args, **kwargs).result()

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """One call on the next free replica, as a :class:`concurrent.futures.Future`."""
        self._check_open()
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        self._pool.submit(Task(0, ser.STAR, [args], kwargs, FutureSink(future), self.timeout))
        return future

    def _run(
        self, mode: int, items: Iterator[Any], total: int | None, opts: MapOptions, ordered: bool
    ) -> Iterator[Any]:
        self._check_open()
        return _MapRun(self, mode, items, total, opts, ordered).results()

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
        self._pool.close()
        for thread in helpers:
            thread.join(10)
        owned = [r.remote.servlet for r in self._pool.replicas if r.owned]
        for servlet in owned:
            servlet.cluster.stop_servlet(servlet)
        self._stop_early()

    def _check_open(self) -> None:
        if self._closed:
            raise RunmapError("this Mapper is closed")

    def __enter__(self) -> Mapper:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Mapper {self._prototype.module_name}.{self.method or '__call__'} replicas={self.num_replicas}>"


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _MapRun:
    """One map in progress: its input window, its sink, and its results in waiting."""

    def __init__(
        self, mapper: Mapper, mode: int, items: Iterator[Any], total: int | None, opts: MapOptions, ordered: bool
    ) -> None:
        self.mapper = mapper
        self.pool = mapper._pool
        self.mode = mode
        self.items = items
        self.total = total
        self.opts = opts
        self.ordered = ordered
        self.timeout = opts.timeout if opts.timeout is not None else mapper.timeout
        slots = max(1, len(self.pool.alive) * mapper.concurrency)
        self.chunks = chunker(opts.chunksize, slots)
        self.window = 2 * slots
        self.read_ahead = READ_AHEAD * slots
        self.sink = Sink()
        self.read = 0
        self.inflight = 0
        self.exhausted = False
        self.ready: dict[int, list[Any]] = {}  # chunk start -> its results (or _Failure)
        self.retried: dict[int, int] = {}  # input index -> re-runs after its user code raised
        self.checkpoint = Checkpoint(opts.checkpoint) if opts.checkpoint is not None else None
        self.hashes: dict[int, str] = {}  # input index -> input hash, while in flight

    def results(self) -> Iterator[Any]:
        bar = Progress(self.opts.progress, self.total, _describe(self.mapper))
        next_index = 0
        try:
            while True:
                self._fill()
                if self.ordered:
                    while next_index in self.ready:
                        chunk = self.ready.pop(next_index)
                        next_index += len(chunk)
                        yield from self._unwrap(chunk)
                else:
                    for start in list(self.ready):
                        yield from self._unwrap(self.ready.pop(start))
                if self.exhausted and self.inflight == 0 and not self.ready:
                    return
                if self.inflight == 0:
                    continue
                try:
                    event = self.sink.events.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                bar.update(self._receive(*event))
        finally:
            self.sink.cancelled = True
            self.pool.tasks.discard(self.sink)
            bar.close()
            if self.checkpoint is not None:
                self.checkpoint.close()

    def _fill(self) -> None:
        # In flight: at most the window. Read but not yet yielded (in flight, or done
        # and waiting behind a slow input): at most READ_AHEAD chunks a slot, so that
        # other replicas keep busy behind a slow input, but memory stays bounded
        # however long it takes.
        while not self.exhausted and self.inflight < self.window and self.inflight + len(self.ready) < self.read_ahead:
            remaining = None if self.total is None else self.total - self.read
            batch = list(islice(self.items, self.chunks.next_size(remaining)))
            if not batch:
                self.exhausted = True
                return
            start = self.read
            self.read += len(batch)
            if self.checkpoint is None:
                self._send(batch, start)
            else:
                self._send_unsaved(batch, start)

    def _send_unsaved(self, batch: list[Any], start: int) -> None:
        """Takes saved results from the checkpoint and sends only the runs of inputs without one."""
        assert self.checkpoint is not None
        run: list[Any] = []
        for i, item in enumerate(batch):
            index = start + i
            digest = Checkpoint.hash_input(item)
            saved = self.checkpoint.lookup(index, digest)
            if saved is MISSING:
                self.hashes[index] = digest
                run.append(item)
                continue
            if run:
                self._send(run, index - len(run))
                run = []
            self.ready[index] = [saved]
        if run:
            self._send(run, start + len(batch) - len(run))

    def _send(self, batch: list[Any], start: int) -> None:
        try:
            task = Task(start, self.mode, batch, self.opts.kwargs, self.sink, self.timeout)
        except SerializationError as exc:
            if exc.index is None:
                raise
            k = exc.index - start
            if k > 0:
                self._send(batch[:k], start)
            exc.replica = None
            self.ready[exc.index] = [_Failure(exc)]
            if k + 1 < len(batch):
                self._send(batch[k + 1 :], exc.index + 1)
            return
        self.inflight += 1
        self.pool.submit(task)

    def _receive(self, task: Task, outcome: Any, replica: str | None, seconds: float) -> int:
        """Files one event's results under their chunk; returns how many inputs completed."""
        if outcome is SPLIT:
            self.inflight += int(seconds) - 1  # the split's part count travels in the seconds field
            return 0
        self.inflight -= 1
        if not isinstance(outcome, ser.Outcome):
            self._forget(task.indexes)
            self.ready[task.start] = [_Failure(outcome)] * task.count
            return task.count
        self.chunks.record(task.count, seconds, len(task.payload))
        results: list[Any] = outcome.results
        retry = []
        for i, err in outcome.errors.items():
            exc = _localize(err.to_exception(), task.start + i, replica)
            if self._should_retry(task.start + i, exc):
                retry.append(i)
            results[i] = _Failure(exc)
        if self.checkpoint is not None:
            self.checkpoint.save(
                [
                    (task.start + i, self.hashes[task.start + i], r)
                    for i, r in enumerate(results)
                    if i not in outcome.errors
                ]
            )
            self._forget(i for i in task.indexes if i - task.start not in retry)
        if not retry:
            self.ready[task.start] = results
            return task.count
        # Re-run the inputs whose user code raised a retryable error; file the rest in pieces.
        for i, part in enumerate(task.split()):
            if i in retry:
                self.retried[part.start] = self.retried.get(part.start, 0) + 1
                self.inflight += 1
                self.pool.submit(part)
            else:
                self.ready[part.start] = [results[i]]
        return task.count - len(retry)

    def _should_retry(self, index: int, exc: BaseException) -> bool:
        kinds = self.mapper.retry_exceptions
        return bool(kinds) and isinstance(exc, kinds) and self.retried.get(index, 0) < self.mapper.retries

    def _forget(self, indexes: Iterable[int]) -> None:
        if self.checkpoint is not None:
            for i in indexes:
                self.hashes.pop(i, None)

    def _unwrap(self, chunk: list[Any]) -> Iterator[Any]:
        for value in chunk:
            if isinstance(value, _Failure):
                if self.opts.return_exceptions:
                    yield value.exc
                else:
                    raise value.exc
            else:
                yield value


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


def _localize(exc: BaseException, index: int, replica: str | None) -> BaseException:
    """A servlet's "result of input #i of its chunk" error, with the map's index and the replica."""
    if isinstance(exc, SerializationError) and exc.side == "result":
        message = re.sub(r"input #\d+ of its chunk", f"input {index}", str(exc))
        localized = SerializationError(f"{message} on {replica}", index=index, side="result", replica=replica)
        localized.__cause__ = exc.__cause__
        return localized
    return exc


def _resolve_target(
    target: Any,
    method: str | None,
    cluster: Cluster | None,
    env: Env | None,
    on_placing: Callable[[Cluster, Env], None] | None = None,
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
        raise ConfigError("map over an instance: build one first, e.g. rm.module(Cls).to(cluster)(*init_args)")
    fn = target.fn if isinstance(target, Function) else target
    if not callable(fn):
        raise ConfigError(f"cannot map over {type(target).__name__}: it is not callable")
    if method is not None:
        fn = getattr(fn, method)
    from runmap.cluster import default_cluster

    where = cluster or default_cluster()
    base = env or Env(name=_env_name(fn))
    placed_env = where.unique_env(base)
    if on_placing is not None:
        on_placing(where, placed_env)
    remote = Function(fn).to(where, env=placed_env)
    return remote, None, True, True


def _env_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", "") or type(fn).__name__
    name = re.sub(r"[^A-Za-z0-9_.-]", "", name) or "fn"
    return "lambda" if name == "lambda" else name


def _describe(mapper: Mapper) -> str:
    return mapper.method or mapper._prototype.module_name.rsplit("-", 1)[0]


def _options(options: dict[str, Any]) -> MapOptions:
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise ConfigError(
            f"unknown map option(s) {sorted(unknown)}; options are {sorted(_OPTION_NAMES)}. "
            "Pass keyword arguments for the mapped function as kwargs={...}."
        )
    opts = MapOptions(**options)
    if opts.kwargs is not None and not isinstance(opts.kwargs, dict):
        raise ConfigError(f"kwargs must be a dict, not {type(opts.kwargs).__name__}")
    return opts


def _zip(iterables: tuple[Iterable[Any], ...]) -> tuple[int, Iterator[Any], int | None]:
    if not iterables:
        raise ConfigError("map needs at least one iterable")
    lengths = [_len(it) for it in iterables]
    total = None if None in lengths else min(lengths)  # type: ignore[type-var]
    if len(iterables) == 1:
        return ser.SINGLE, iter(iterables[0]), total
    return ser.STAR, zip(*iterables), total  # noqa: B905 - zip stops at the shortest, as map does


def _len(it: Any) -> int | None:
    try:
        return len(it)
    except TypeError:
        return None


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, not {value!r}")
