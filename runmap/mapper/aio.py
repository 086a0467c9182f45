"""Maps for asyncio code: ``await mapper.amap(xs)``, ``async for r in mapper.aimap(xs)`` (or ``aimap_unordered``).

    event loop (the caller's)                        worker thread "runmap-aio-<n>"
    ─────────────────────────                        ──────────────────────────────
    async for r in aimap(...) ◄── asyncio.Queue ◄─── for r in mapper.imap(...):  (blocking)
          │                      (call_soon_threadsafe)    wait for room in the buffer
          │
          └── cancelled, closed or garbage-collected ──► MapRun.cancel(), wait for the worker

The map itself is :meth:`Mapper.imap` (or a placed Mapper's), unchanged, run in a thread of its own so
the event loop never blocks. At most ``BUFFER`` results wait to be consumed:
past that the worker stops reading results (and so, through the Mapper's
bounded window, stops reading inputs) until the consumer catches up.

Stopping has to reach a worker that may be blocked inside the map, waiting for
a slow call: :meth:`MapRun.cancel` wakes the map loop with an event of its own,
and the loop drops its queued inputs and returns at once.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Generator
from typing import TYPE_CHECKING, Any, Protocol

from runmap.mapper.run import zip_inputs

if TYPE_CHECKING:
    from runmap.mapper.mapper import Mapper


class Run(Protocol):
    """A map not yet started: a local Mapper's (run.py) or a placed Mapper's (remote.py)."""

    def results(self) -> Generator[Any, None, None]: ...

    def cancel(self) -> None:
        """Makes :meth:`results` stop soon, from another thread."""

BUFFER = 64  # results handed to the event loop and not yet consumed
EXIT_WAIT = 5.0  # seconds a cancelled map waits for its worker to end

_VALUE, _ERROR, _END = "value", "error", "end"
_names = itertools.count(1)


async def amap(mapper: Mapper, *iterables: Any, **options: Any) -> list[Any]:
    """``await`` form of :meth:`Mapper.map`: every result, in input order."""
    return [r async for r in aimap(mapper, *iterables, **options)]


def aimap(mapper: Mapper, *iterables: Any, **options: Any) -> AsyncIterator[Any]:
    """``async for`` form of :meth:`Mapper.imap`: results in input order, as they arrive.

    Bad options raise here, at once; the map starts at the first iteration.
    """
    return iterate(mapper._start(*zip_inputs(iterables), options, ordered=True))


def aimap_unordered(mapper: Mapper, *iterables: Any, **options: Any) -> AsyncIterator[Any]:
    """``async for`` form of :meth:`Mapper.imap_unordered`: results as they complete, in any order."""
    return iterate(mapper._start(*zip_inputs(iterables), options, ordered=False))


async def iterate(run: Run) -> AsyncIterator[Any]:
    """The results of ``run``, read by a worker thread and handed to this event loop."""
    worker = _Worker(run, asyncio.get_running_loop())
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

    def __init__(self, run: Run, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.room = threading.Semaphore(BUFFER)
        self.exited: asyncio.Future[None] = loop.create_future()
        self._run_ = run
        self._loop = loop
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"runmap-aio-{next(_names)}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Makes the thread leave the map and end; returns at once."""
        self._stopping.set()
        self.room.release()  # wakes it if it waits for room
        self._run_.cancel()  # wakes it if it waits for a result

    # ------------------------------------------------------- worker thread

    def _run(self) -> None:
        results = self._run_.results()
        try:
            for value in results:
                self.room.acquire()
                if self._stopping.is_set():
                    return
                self._post(_VALUE, value)
            if not self._stopping.is_set():
                self._post(_END, None)
        except BaseException as exc:
            self._post(_ERROR, exc)
        finally:
            results.close()
            self._notify_exit()

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
