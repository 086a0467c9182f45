"""Maps for asyncio code: ``await mapper.amap(xs)`` and ``async for r in mapper.aimap(xs)``.

    event loop (the caller's)                        worker thread "runmap-aio-<n>"
    ─────────────────────────                        ──────────────────────────────
    async for r in aimap(...) ◄── asyncio.Queue ◄─── for r in mapper.imap(...):  (blocking)
          │                      (call_soon_threadsafe)    wait for room in the buffer
          │
          └── cancelled, closed or garbage-collected ──► stop the worker, wait for it to end

The map itself is :meth:`Mapper.imap`, unchanged, run in a thread of its own so
the event loop never blocks. At most ``BUFFER`` results wait to be consumed:
past that the worker stops reading results (and so, through the Mapper's
bounded window, stops reading inputs) until the consumer catches up.

Stopping has to reach a worker that may be blocked inside ``imap`` waiting for
a slow call. Python offers no way to cancel a thread, so the worker is
interrupted the way Ctrl-C interrupts a map in the main thread: an exception
(:class:`_Interrupt`) raised asynchronously in it, which ``imap`` handles by
dropping its queued inputs and leaving, within its poll interval.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runmap.mapper.mapper import Mapper

BUFFER = 64  # results handed to the event loop and not yet consumed
EXIT_WAIT = 5.0  # seconds a cancelled map waits for its worker to end

_VALUE, _ERROR, _END = "value", "error", "end"
_names = itertools.count(1)


class _Interrupt(BaseException):
    """Raised inside the worker thread to make it leave ``imap``."""


async def amap(mapper: Mapper, *iterables: Any, **options: Any) -> list[Any]:
    """``await`` form of :meth:`Mapper.map`: every result, in input order."""
    return [r async for r in aimap(mapper, *iterables, **options)]


def aimap(mapper: Mapper, *iterables: Any, **options: Any) -> AsyncIterator[Any]:
    """``async for`` form of :meth:`Mapper.imap`: results in input order, as they arrive.

    Bad options raise here, at once; the map starts at the first iteration.
    """
    results = mapper.imap(*iterables, **options)
    return _results(results)


async def _results(results: Iterator[Any]) -> AsyncIterator[Any]:
    worker = _Worker(results, asyncio.get_running_loop())
    try:
        while True:
            kind, value = await worker.queue.get()
            if kind == _VALUE:
                worker.room.release()
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        worker.stop()
        await asyncio.wait({worker.exited}, timeout=EXIT_WAIT)


class _Worker:
    """The thread that runs a blocking ``imap`` and posts its results to the event loop."""

    def __init__(self, results: Iterator[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.room = threading.Semaphore(BUFFER)
        self.exited: asyncio.Future[None] = loop.create_future()
        self._results = results
        self._loop = loop
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._interruptible = False  # the thread is inside the part an _Interrupt may hit
        self._interrupted = False
        self._thread = threading.Thread(target=self._run, name=f"runmap-aio-{next(_names)}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Makes the thread leave ``imap`` and end; returns at once."""
        self._stopping.set()
        self.room.release()  # wakes it if it waits for room
        with self._lock:
            if self._interruptible and not self._interrupted and self._thread.ident is not None:
                self._interrupted = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self._thread.ident), ctypes.py_object(_Interrupt)
                )

    # ------------------------------------------------------- worker thread

    def _run(self) -> None:
        try:
            try:
                self._pump()
            finally:
                self._disarm()
        except _Interrupt:
            pass
        except BaseException as exc:
            self._post(_ERROR, exc)
        finally:
            close = getattr(self._results, "close", None)
            if close is not None:
                close()
            self._notify_exit()

    def _pump(self) -> None:
        with self._lock:
            self._interruptible = True
        if self._stopping.is_set():
            return
        for value in self._results:
            self.room.acquire()
            if self._stopping.is_set():
                return
            self._post(_VALUE, value)
        self._post(_END, None)

    def _disarm(self) -> None:
        """Leaves the interruptible part; drops an interrupt that was sent but has not struck yet."""
        with self._lock:
            self._interruptible = False
            if self._interrupted and self._thread.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread.ident), None)

    def _post(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._stopping.set()

    def _notify_exit(self) -> None:
        def mark() -> None:
            if not self.exited.done():
                self.exited.set_result(None)

        try:
            self._loop.call_soon_threadsafe(mark)
        except RuntimeError:
            pass
