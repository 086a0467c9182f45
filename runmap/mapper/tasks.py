"""Units of work and where their outcomes go.

A :class:`Task` is one chunk of consecutive inputs of one map (or one
``submit``), already serialized. Its :class:`Sink` hears of each task once,
when it ends, in one of three ways:

- :meth:`Sink.done`, with the chunk's outcome;
- :meth:`Sink.failed`, with an error that stands for every input of the chunk;
- :meth:`Sink.split`: the pool replaced it by one task per input (a replica
  died or timed out under it, so each input gets a try of its own), and each
  of those is then heard of once, by ``done`` or ``failed``.

A task re-queued whole after its replica died is not heard of until then:
retries happen inside the pool.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeAlias

from runmap import serialization as ser


class Sink:
    """Where the final events of a map's tasks go: a queue the map loop reads."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[Any, ...] | list[Outcomed]] = queue.SimpleQueue()
        self.cancelled = False
        self.seconds: float | None = None  # how long its calls take, on average (set by dispatch.py)

    def done(self, task: Task, outcome: ser.Outcome, replica: str, seconds: float) -> None:
        self.events.put((task, outcome, replica, seconds))

    def done_many(self, events: list[Outcomed]) -> None:
        """Several tasks' outcomes (the answers of one read): one event, so the map loop wakes once."""
        self.events.put(events)

    def failed(self, task: Task, exc: BaseException) -> None:
        self.events.put((task, exc, None, 0.0))

    def split(self, task: Task, parts: list[Task]) -> None:
        """``task`` was replaced by ``parts``, each of which will get its own event."""
        self.events.put((task, Split(len(parts)), None, 0.0))


    def requeued(self, task: Task) -> None:
        """``task`` lost its replica and runs again, whole (it is still in flight)."""
        self.events.put((task, Requeued(task.count), None, 0.0))


Outcomed: TypeAlias = "tuple[Task, ser.Outcome, str, float]"  # what Sink.done hears: task, outcome, replica, seconds


@dataclass(frozen=True)
class Requeued:
    """The event of a task queued again after its replica died: ``count`` inputs run again."""

    count: int


@dataclass(frozen=True)
class Split:
    """The event of a task replaced by ``parts`` single-input tasks."""

    parts: int


class FutureSink(Sink):
    """The sink of a single ``submit``: resolves a :class:`concurrent.futures.Future`."""

    def __init__(self, future: Future[Any]) -> None:
        super().__init__()
        self.future = future

    def done(self, task: Task, outcome: ser.Outcome, replica: str, seconds: float) -> None:
        task.items.clear()  # the call is over: its arguments must not outlive it (its pickle stays)
        if outcome.errors:
            self.future.set_exception(outcome.errors[0].to_exception(None, replica))
        else:
            self.future.set_result(outcome.results[0])

    def requeued(self, task: Task) -> None:
        pass

    def done_many(self, events: list[Outcomed]) -> None:
        for event in events:
            self.done(*event)

    def failed(self, task: Task, exc: BaseException) -> None:
        task.items.clear()
        self.future.set_exception(exc)


@dataclass(eq=False, slots=True)
class Task:
    """A chunk of consecutive inputs, starting at input ``start``, to send.

    The items are kept beside their pickle so that a chunk lost with a replica
    can be split and retried input by input: one input that kills every
    replica it touches must not take its chunk-mates down with it.

    The pickle is made by the thread that first sends the task (the dispatch
    thread), not by the map's: a map's thread that pickled its first chunks
    kept the GIL from the dispatch thread until it blocked, so no servlet began
    before every chunk of the window was pickled (~0.5 ms of a 20k-input map
    on 2 cores). ``multiprocessing.Pool`` pickles in its task thread too.
    """

    start: int
    mode: int
    items: list[Any]
    kwargs: dict[str, Any] | None
    sink: Sink
    timeout: float | None = None
    payload: bytes = b""
    attempts: int = 0
    lost_on: list[str] = field(default_factory=list)
    in_thread: bool = False  # run in a servlet thread, never on its event loop (see pool._lost)
    alone: bool = False  # lost with a replica: runs with no other call beside it (see dispatch.py)

    def serialized(self) -> bytes:
        """The chunk's pickle, made on first use.

        Raises:
            SerializationError: naming the first input that can't be pickled (``side="argument"``).
        """
        if not self.payload:
            self.payload = ser.dump_call(self.mode, self.items, self.kwargs, base_index=self.start)
        return self.payload

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def indexes(self) -> range:
        return range(self.start, self.start + self.count)

    def split(self) -> list[Task]:
        """One task per input, with this task's history."""
        return [
            Task(self.start + i, self.mode, [item], self.kwargs, self.sink, self.timeout,
                 attempts=self.attempts, lost_on=list(self.lost_on), in_thread=self.in_thread, alone=self.alone)
            for i, item in enumerate(self.items)
        ]


class TaskQueue:
    """FIFO of tasks shared by the dispatch thread and any slot threads; a retried task goes to the front."""

    def __init__(self) -> None:
        self._tasks: deque[Task] = deque()
        self._lock = threading.Lock()  # a plain lock: taken twice per task, it must be cheap
        self._cv = threading.Condition(self._lock)
        self._waiting = 0  # slot threads blocked in get(): only then does put() notify
        self._closed = False
        self.on_put: Callable[[], None] | None = None  # told of every task queued (the dispatch thread's wake-up)

    def __len__(self) -> int:
        return len(self._tasks)

    def put(self, task: Task, front: bool = False) -> None:
        with self._lock:
            if front:
                self._tasks.appendleft(task)
            else:
                self._tasks.append(task)
            if self._waiting:
                self._cv.notify()
        on_put = self.on_put
        if on_put is not None:
            on_put()

    def get(self, stop: Callable[[], bool]) -> Task | None:
        """The next task, or None once the queue is closed or ``stop()`` is true."""
        with self._cv:
            while True:
                if self._closed or stop():
                    return None
                if self._tasks:
                    return self._tasks.popleft()
                self._waiting += 1
                try:
                    self._cv.wait()
                finally:
                    self._waiting -= 1

    def get_nowait(self, accept: Callable[[Task], bool] | None = None) -> Task | None:
        """The next task, or None if there is none now (or the queue is closed, or ``accept`` refuses it)."""
        with self._lock:
            if self._closed or not self._tasks or (accept is not None and not accept(self._tasks[0])):
                return None
            return self._tasks.popleft()

    def unpickled(self, within: int) -> Task | None:
        """The first task not pickled yet among the first ``within`` queued (see :meth:`Task.serialized`)."""
        with self._lock:
            for task in islice(self._tasks, within):
                if not task.payload:
                    return task
        return None

    def wake_all(self) -> None:
        """Makes every waiting :meth:`get` look at its ``stop`` again."""
        with self._cv:
            self._cv.notify_all()

    def drain(self) -> list[Task]:
        with self._cv:
            tasks = list(self._tasks)
            self._tasks.clear()
            return tasks

    def discard(self, sink: Sink) -> None:
        """Drops the queued tasks of a map that no longer wants them."""
        with self._cv:
            self._tasks = deque(t for t in self._tasks if t.sink is not sink)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
