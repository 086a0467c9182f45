"""``rm.Pool``: a drop-in for :class:`multiprocessing.pool.Pool` whose workers are runmap replicas.

    pool.map(f, xs) ──► chunks of xs (as Pool cuts them) ──► Mapper.submit ──► replica runs
          │                                                    _run_chunk(f, chunk)
          ▼                                                         │
    MapResult / IMapIterator ◄── per-chunk results, in order ◄──────┘

Every replica runs one generic function, :func:`_run_chunk`, and every call
ships the function it applies (by value when it was defined in ``__main__`` or
a notebook), so one set of replicas serves ``map``, ``starmap`` and ``apply``
of any function. A chunk is one *task*, as in :mod:`multiprocessing`:
``maxtasksperchild`` counts chunks, and ``initializer(*initargs)`` runs in a
replica before its first task.

A replica that has run ``maxtasksperchild`` tasks exits when the next one
reaches it, before running it; the Mapper re-runs that task on another
replica (it never ran, so it runs once) and starts a replacement, whose
first task runs the initializer again.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import multiprocessing.pool
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from functools import partial
from typing import Any

from runmap.cluster.base import Cluster
from runmap.envs.env import Env
from runmap.exceptions import RemoteTraceback, SerializationError
from runmap.mapper.mapper import Mapper

_SINGLE, _STAR, _APPLY = 0, 1, 2
_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"

# In a replica: pool token -> tasks (chunks) run there so far.
_tasks_done: dict[str, int] = {}
_tasks_lock = threading.Lock()


def _run_chunk(
    token: str,
    client_pid: int,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    maxtasks: int | None,
    func: Callable[..., Any],
    mode: int,
    chunk: list[Any],
) -> list[Any]:
    """What every replica runs: one task (a chunk of inputs) of one Pool."""
    with _tasks_lock:
        done = _tasks_done.get(token)
        if done is None:
            if initializer is not None:
                initializer(*initargs)
            done = 0
        if maxtasks is not None and done >= maxtasks and os.getpid() != client_pid:
            # This replica has run its tasks: it ends before running this one, which
            # the Mapper then runs on another replica while it starts a replacement.
            os._exit(0)
        _tasks_done[token] = done + 1
    if mode == _SINGLE:
        return [func(x) for x in chunk]
    if mode == _STAR:
        return [func(*x) for x in chunk]
    args, kwds = chunk[0]
    return [func(*args, **kwds)]


def _pool_exception(exc: BaseException) -> BaseException:
    """The exception as CPython's Pool raises it: the remote traceback as a ``multiprocessing.pool.RemoteTraceback``."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        remote_traceback = multiprocessing.pool.RemoteTraceback  # type: ignore[attr-defined]
        exc.__cause__ = remote_traceback('\n"""\n' + cause.tb + '"""')
    return exc


class ApplyResult:
    """The result of :meth:`Pool.apply_async`, as :class:`multiprocessing.pool.AsyncResult` behaves."""

    def __init__(self, callback: Callable[[Any], Any] | None, error_callback: Callable[[BaseException], Any] | None):
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, success: bool, value: Any) -> None:
        if self._event.is_set():
            return
        self._success, self._value = success, value
        if success and self._callback is not None:
            self._callback(value)
        if not success and self._error_callback is not None:
            self._error_callback(value)
        self._event.set()
        self._callback = self._error_callback = None  # keep nothing of the user's beyond the result


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of :meth:`Pool.map_async` and :meth:`Pool.starmap_async`: ready when every chunk is, or one failed."""

    def __init__(
        self,
        n_chunks: int,
        callback: Callable[[Any], Any] | None,
        error_callback: Callable[[BaseException], Any] | None,
    ) -> None:
        super().__init__(callback, error_callback)
        self._chunks: list[list[Any] | None] = [None] * n_chunks
        self._left = n_chunks
        self._lock = threading.Lock()
        if n_chunks == 0:
            self._set(True, [])

    def _chunk_done(self, i: int, future: Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            self._set(False, _pool_exception(exc))
            return
        with self._lock:
            self._chunks[i] = future.result()
            self._left -= 1
            last = self._left == 0
        if last:
            self._set(True, [r for chunk in self._chunks for r in chunk or ()])
            self._chunks = []


class IMapIterator:
    """The iterator of :meth:`Pool.imap` (in order) and :meth:`Pool.imap_unordered` (as completed).

    A thread of its own reads the inputs and hands their chunks to the replicas
    as soon as the call is made, as CPython's Pool does; ``next(timeout)``
    raises :class:`multiprocessing.TimeoutError` when no result comes in time.
    """

    def __init__(self, pool: Pool, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int, ordered: bool):
        self._pool = pool
        self._ordered = ordered
        self._cond = threading.Condition()
        self._futures: list[Future[Any]] = []  # in input order
        self._done: deque[Future[Any]] = deque()  # in completion order
        self._buffer: deque[Any] = deque()  # results of the chunk being yielded
        self._next_chunk = 0
        self._fed_all = False
        self._feed_error: BaseException | None = None
        self._feeder = threading.Thread(
            target=self._feed, args=(func, iterable, chunksize), name="runmap-pool-imap", daemon=True
        )
        pool._feeders.add(self._feeder)
        self._feeder.start()

    def _feed(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int) -> None:
        try:
            items = iter(iterable)
            while not self._pool._stopping.is_set():
                chunk = list(itertools.islice(items, chunksize))
                if not chunk:
                    break
                future = self._pool._submit(func, _SINGLE, chunk)
                with self._cond:
                    self._futures.append(future)
                future.add_done_callback(self._completed)
        except BaseException as exc:  # the inputs raised: CPython's imap raises it in their place
            with self._cond:
                self._feed_error = exc
        finally:
            with self._cond:
                self._fed_all = True
                self._cond.notify_all()
            self._pool._feeders.discard(threading.current_thread())

    def _completed(self, future: Future[Any]) -> None:
        with self._cond:
            self._done.append(future)
            self._cond.notify_all()

    def __iter__(self) -> IMapIterator:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        while not self._buffer:
            future = self._next_future(timeout)
            exc = future.exception()
            if exc is not None:
                raise _pool_exception(exc)
            self._buffer.extend(future.result())
        return self._buffer.popleft()

    def _next_future(self, timeout: float | None) -> Future[Any]:
        with self._cond:
            while True:
                if self._ordered:
                    if self._next_chunk < len(self._futures) and self._futures[self._next_chunk].done():
                        future = self._futures[self._next_chunk]
                        self._futures[self._next_chunk] = None  # type: ignore[call-overload]
                        self._next_chunk += 1
                        return future
                    exhausted = self._fed_all and self._next_chunk >= len(self._futures)
                else:
                    if self._done:
                        self._next_chunk += 1
                        return self._done.popleft()
                    exhausted = self._fed_all and self._next_chunk >= len(self._futures)
                if exhausted:
                    if self._feed_error is not None:
                        error, self._feed_error = self._feed_error, None
                        raise error
                    raise StopIteration
                if not self._cond.wait(timeout):
                    raise multiprocessing.TimeoutError


class Pool:
    """A :class:`multiprocessing.pool.Pool` whose worker processes are runmap replicas.

    Change the import and keep the code: ``map``, ``imap``, ``starmap``,
    ``apply`` and their ``_async`` forms, ``close``/``join``/``terminate``,
    ``initializer``, ``maxtasksperchild`` and ``chunksize`` behave as the
    standard library defines them, and an exception raised by the function is
    re-raised as its own type with a :class:`multiprocessing.pool.RemoteTraceback`
    as its ``__cause__``. Any function can be used, lambdas and closures
    included: it travels with the call.

    Args:
        processes: replicas to start (default: ``os.cpu_count()``).
        initializer: called as ``initializer(*initargs)`` in each replica before its first task.
        initargs: its arguments.
        maxtasksperchild: tasks (chunks) a replica runs before it is replaced (default: no limit).
        context: accepted for compatibility and ignored.
        cluster: where the replicas run (default: the embedded local cluster).
        env: their env (default: one named ``"pool"`` using this interpreter).
        stream_logs: show what the replicas print (default True).

    Example:
        >>> import runmap as rm
        >>> with rm.Pool(2) as pool:
        ...     print(pool.map(abs, [-1, -2, 3]), pool.apply(pow, (2, 10)))
        [1, 2, 3] 1024
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        cluster: Cluster | None = None,
        env: Env | None = None,
        stream_logs: bool = True,
    ) -> None:
        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._processes = processes
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._maxtasks = maxtasksperchild
        self._token = uuid.uuid4().hex
        self._state = _RUN
        self._lock = threading.Lock()
        self._outstanding: set[Future[Any]] = set()
        self._feeders: set[threading.Thread] = set()
        self._stopping = threading.Event()
        # A task that reaches a replica that ran its tasks is re-run elsewhere: that must not use up its retries.
        retries = 3 + (processes if maxtasksperchild is not None else 0)
        self._mapper = Mapper(
            _run_chunk,
            num_replicas=processes,
            cluster=cluster,
            env=env or Env(name="pool"),
            retries=retries,
            stream_logs=stream_logs,
        ).start()  # as multiprocessing.Pool's, the workers start with the pool

    # ------------------------------------------------------------- the API

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None) -> Any:
        """``func(*args, **kwds)`` on a replica; blocks for its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> ApplyResult:
        """``func(*args, **kwds)`` on a replica, as an :class:`ApplyResult`."""
        self._check_running()
        result = ApplyResult(callback, error_callback)
        future = self._submit(func, _APPLY, [(tuple(args), dict(kwds or {}))])

        def done(f: Future[Any]) -> None:
            exc = f.exception()
            result._set(exc is None, _pool_exception(exc) if exc is not None else f.result()[0])

        future.add_done_callback(done)
        return result

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None) -> list[Any]:
        """Like the built-in ``map`` (one iterable): every result, in input order."""
        return self._map_async(func, iterable, _SINGLE, chunksize).get()  # type: ignore[no-any-return]

    def map_async(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> MapResult:
        return self._map_async(func, iterable, _SINGLE, chunksize, callback, error_callback)

    def starmap(
        self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]], chunksize: int | None = None
    ) -> list[Any]:
        """Like :meth:`map`, with each input unpacked as the arguments: ``func(*args)``."""
        return self._map_async(func, iterable, _STAR, chunksize).get()  # type: ignore[no-any-return]

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> MapResult:
        return self._map_async(func, iterable, _STAR, chunksize, callback, error_callback)

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1) -> IMapIterator:
        """Results in input order, as they come; the inputs may be a generator."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1) -> IMapIterator:
        """Results as they complete, in any order."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def close(self) -> None:
        """No more work; the replicas end once the work given is done (see :meth:`join`)."""
        with self._lock:
            if self._state == _RUN:
                self._state = _CLOSE

    def terminate(self) -> None:
        """Ends the replicas now; work not finished is dropped."""
        with self._lock:
            self._state = _TERMINATE
        self._stopping.set()
        self._mapper.close()
        self._join_feeders()

    def join(self) -> None:
        """Waits for the work given to finish and the replicas to end; call :meth:`close` or :meth:`terminate` first."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        if self._state == _CLOSE:
            self._join_feeders()
            with self._lock:
                outstanding = list(self._outstanding)
            concurrent.futures.wait(outstanding)
        self._mapper.close()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"<runmap.Pool state={self._state} pool_size={self._processes}>"

    # ------------------------------------------------------------ internals

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _submit(self, func: Callable[..., Any], mode: int, chunk: list[Any]) -> Future[Any]:
        """One task on the next free replica; an argument that cannot be pickled fails its future."""
        try:
            future = self._mapper.submit(
                self._token, os.getpid(), self._initializer, self._initargs, self._maxtasks, func, mode, chunk
            )
        except SerializationError as exc:
            future = Future()
            future.set_exception(
                SerializationError(f"a task of this Pool could not be pickled to send it to a replica: {exc}")
            )
            future.exception().__cause__ = exc.__cause__ or exc  # type: ignore[union-attr]
            return future
        with self._lock:
            self._outstanding.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._outstanding.discard(future)

    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        mode: int,
        chunksize: int | None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> MapResult:
        self._check_running()
        items = iterable if hasattr(iterable, "__len__") else list(iterable)
        items = list(items)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        if len(items) == 0:
            chunksize = 0
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)] if chunksize else []
        result = MapResult(len(chunks), callback, error_callback)
        for i, chunk in enumerate(chunks):
            future = self._submit(func, mode, chunk)
            future.add_done_callback(partial(result._chunk_done, i))
        return result

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int, ordered: bool) -> IMapIterator:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        return IMapIterator(self, func, iterable, chunksize, ordered)

    def _join_feeders(self) -> None:
        for thread in list(self._feeders):
            if thread is not threading.current_thread():
                thread.join()


__all__ = ["ApplyResult", "AsyncResult", "IMapIterator", "MapResult", "Pool"]
