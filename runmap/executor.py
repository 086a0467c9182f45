"""``rm.Executor``: a :class:`concurrent.futures.Executor` whose workers are runmap replicas.

    submit(fn, *args) ──► pending futures ──► Mapper.submit(fn, args, kwargs) ──► replica runs
          │               (here; cancellable)   (at most slots + 1 at a time)     _apply(fn, args, kwargs)
          ▼                                              │
    the user's Future ◄──── result or exception ◄────────┘

The replicas all run one generic function, :func:`_apply`, and every call ships
the function it should apply with its arguments, so one set of replicas serves
any function. Dispatch, retries and replica deaths are the Mapper's business.

Only ``slots + 1`` calls are handed to the Mapper at a time (as the standard
library's process pool keeps one call queued beyond its workers); the others
wait here as *pending* futures, which is what lets ``Future.cancel()`` and
``shutdown(cancel_futures=True)`` work as :mod:`concurrent.futures` defines them.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from runmap.cluster.base import Cluster
from runmap.envs.env import Env
from runmap.exceptions import ReplicaDiedError
from runmap.mapper.mapper import Mapper

EXTRA_QUEUED_CALLS = 1  # calls handed to the Mapper beyond its slots, so no slot waits for the next one


def _apply(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What every replica runs: the function that came with the call."""
    return fn(*args, **kwargs)


def _apply_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    return [fn(*args) for args in chunk]


@dataclass(eq=False)
class _WorkItem:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class Executor(concurrent.futures.Executor):
    """A :class:`concurrent.futures.Executor` that runs calls on runmap replicas.

    Any function can be submitted: it travels with the call (by value when it
    was defined in ``__main__`` or a notebook). A call that raises re-raises the
    same exception type from ``Future.result()``, with the replica's traceback
    as its ``__cause__``.

    Args:
        num_replicas: replica processes to start (default: ``os.cpu_count()``).
        cluster: where they run (default: the embedded local cluster).
        env: their env (default: one named ``"executor"`` using this interpreter).

    Example:
        >>> import runmap as rm
        >>> with rm.Executor(num_replicas=2) as ex:
        ...     print(ex.submit(pow, 2, 10).result(), list(ex.map(abs, [-1, -2])))
        1024 [1, 2]
    """

    def __init__(self, num_replicas: int | None = None, cluster: Cluster | None = None, env: Env | None = None) -> None:
        self._mapper = Mapper(_apply, num_replicas=num_replicas, cluster=cluster, env=env or Env(name="executor"))
        self._limit = self._mapper.num_replicas * self._mapper.concurrency + EXTRA_QUEUED_CALLS
        self._lock = threading.Lock()
        self._pending: deque[_WorkItem] = deque()
        self._outstanding: set[Future[Any]] = set()  # pending or running, for shutdown(wait=True)
        self._running: set[Future[Any]] = set()  # handed to the Mapper, not yet settled
        self._dispatching = False
        self._shutdown = False
        self._closer: threading.Thread | None = None

    @property
    def num_replicas(self) -> int:
        """The replicas in rotation now."""
        return self._mapper.num_replicas

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedules ``fn(*args, **kwargs)`` on a replica.

        Raises:
            RuntimeError: after :meth:`shutdown`.
        """
        future: Future[Any] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._pending.append(_WorkItem(future, fn, args, kwargs))
            self._outstanding.add(future)
        future.add_done_callback(self._forget)
        self._dispatch()
        return future

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[Any]:
        """Like the built-in ``map``, with every call run on a replica.

        As in :mod:`concurrent.futures`, every call is submitted at once; the
        iterator yields results in input order, raises a call's exception when
        its result is reached, and raises :class:`TimeoutError` if a result is
        not ready ``timeout`` seconds after ``map`` was called.

        Args:
            chunksize: inputs sent together in one request (fewer round trips).
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = _batched(zip(*iterables, strict=False), chunksize)
        results = super().map(partial(_apply_chunk, fn), chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops accepting calls; ends the replicas once the accepted ones are done.

        Args:
            wait: block until every accepted call is done and the replicas are gone.
            cancel_futures: cancel the calls not yet started.
        """
        with self._lock:
            self._shutdown = True
            cancelled = list(self._pending) if cancel_futures else []
            if cancel_futures:
                self._pending.clear()
        _cancel(cancelled)
        with self._lock:
            outstanding = list(self._outstanding)
        if wait:
            concurrent.futures.wait(outstanding)
            self._mapper.close()
            closer = self._closer
            if closer is not None and closer is not threading.current_thread():
                closer.join()
            return
        with self._lock:
            if self._closer is not None or self._mapper.closed:
                return
            self._closer = threading.Thread(
                target=self._close_when_done, args=(outstanding,), name="runmap-executor-shutdown", daemon=True
            )
        self._closer.start()

    def terminate_workers(self) -> None:
        """Shuts down now: cancels the calls not yet started and ends the replicas.

        The calls running on them fail with :class:`runmap.ReplicaDiedError`
        (as ``ProcessPoolExecutor.terminate_workers`` does in Python 3.14).
        """
        with self._lock:
            self._shutdown = True
            cancelled = list(self._pending)
            self._pending.clear()
        _cancel(cancelled)
        self._mapper.close()
        # A call the Mapper had queued but not started gets no outcome once it is closed.
        with self._lock:
            unsettled = list(self._running)
        for future in unsettled:
            self._settle(future, ReplicaDiedError("the Executor's replicas were terminated before the call ran"), None)

    # ------------------------------------------------------------- internals

    def _dispatch(self) -> None:
        """Hands pending calls to the Mapper while it has room; one thread at a time does it."""
        with self._lock:
            if self._dispatching:
                return  # the thread dispatching now sees this change before it stops
            self._dispatching = True
        while True:
            with self._lock:
                if not self._pending or len(self._running) >= self._limit:
                    self._dispatching = False
                    return
                item = self._pending.popleft()
                if not item.future.set_running_or_notify_cancel():
                    continue  # cancelled while pending
                self._running.add(item.future)
            try:
                inner = self._mapper.submit(item.fn, item.args, item.kwargs)
            except BaseException as exc:  # unpicklable argument, closed Mapper
                self._settle(item.future, exc, None)
            else:
                inner.add_done_callback(partial(self._relay, item.future))

    def _relay(self, outer: Future[Any], inner: Future[Any]) -> None:
        exc = inner.exception()
        self._settle(outer, exc, None if exc is not None else inner.result())
        self._dispatch()

    def _settle(self, future: Future[Any], exc: BaseException | None, result: Any) -> None:
        with self._lock:
            if future not in self._running:
                return  # settled already, by terminate_workers
            self._running.discard(future)
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._outstanding.discard(future)

    def _close_when_done(self, outstanding: list[Future[Any]]) -> None:
        concurrent.futures.wait(outstanding)
        self._mapper.close()

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else f"replicas={self.num_replicas}"
        return f"<runmap.Executor {state}>"


def _cancel(items: list[_WorkItem]) -> None:
    for item in items:
        if item.future.cancel():
            # Marks it notified, as an executor does when it drops a cancelled call,
            # so that concurrent.futures.wait() counts it as done.
            item.future.set_running_or_notify_cancel()


def _batched(items: Iterator[tuple[Any, ...]], n: int) -> Iterator[tuple[tuple[Any, ...], ...]]:
    while chunk := tuple(itertools.islice(items, n)):
        yield chunk
