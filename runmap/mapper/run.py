"""One map in progress: its input window, its chunks in flight, and its results in waiting.

    inputs ──► read lazily, cut into chunks (serialized here, so a bad argument
    (any        is named before anything is sent) ──► ReplicaPool's TaskQueue
    iterable)                                               │
                                                            ▼
    results ◄── in input order (or as completed) ◄── Sink ◄── outcomes, failures

:class:`MapRun` runs in the caller's thread. It keeps at most ``2 × slots``
chunks in flight and at most ``READ_AHEAD`` chunks a slot read but not yet
yielded, so an endless generator, or a slow input at the head of the map,
never makes the client read without bound.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from runmap import serialization as ser
from runmap.exceptions import ConfigError, SerializationError
from runmap.mapper.batching import AdaptiveChunks, FixedChunks, chunker
from runmap.mapper.colocate import SHORT_CALL_SECONDS
from runmap.mapper.dispatch import queue_depth
from runmap.mapper.progress import Progress
from runmap.mapper.tasks import Requeued, Sink, Split, Task

if TYPE_CHECKING:
    from runmap.mapper.checkpoint import Checkpoint
    from runmap.mapper.mapper import Mapper

POLL_SECONDS = 0.5
READ_AHEAD = 16  # chunks a slot that may be read before the oldest is yielded
_WAKE = ("wake",)  # an event that only wakes the map loop (see MapRun.cancel)


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


def parse_options(options: dict[str, Any]) -> MapOptions:
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise ConfigError(
            f"unknown map option(s) {sorted(unknown)}; options are {sorted(_OPTION_NAMES)}. "
            "Pass keyword arguments for the mapped function as kwargs={...}."
        )
    opts = MapOptions(**options)
    if opts.kwargs is not None and not isinstance(opts.kwargs, dict):
        raise ConfigError(f"kwargs must be a dict, not {type(opts.kwargs).__name__}")
    check_timeout(opts.timeout)
    return opts


def check_timeout(timeout: Any) -> None:
    """A request's ``timeout``: None (no limit) or a finite number of seconds > 0."""
    if timeout is None:
        return
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < math.inf:
        raise ConfigError(f"timeout must be a number of seconds > 0, or None for no limit, not {timeout!r}")


def zip_inputs(iterables: tuple[Iterable[Any], ...]) -> tuple[int, Iterator[Any], int | None]:
    if not iterables:
        raise ConfigError("map needs at least one iterable")
    lengths = [input_len(it) for it in iterables]
    total = None if None in lengths else min(lengths)  # type: ignore[type-var]
    if len(iterables) == 1:
        only = iterables[0]
        return ser.SINGLE, ListReader(only) if type(only) is list else iter(only), total
    return ser.STAR, zip(*iterables), total  # noqa: B905 - zip stops at the shortest, as map does


class ListReader:
    """An iterator over a list that also hands out its next inputs as a slice.

    A slice copies a chunk's references in one step: a chunk of 5,000 inputs
    is read in ~12 µs, against ~35 µs through ``islice``, on the map's thread,
    which holds the GIL the dispatch thread needs to send the first chunks.
    """

    __slots__ = ("at", "items")

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.at = 0

    def __iter__(self) -> ListReader:
        return self

    def __next__(self) -> Any:
        if self.at >= len(self.items):
            raise StopIteration
        self.at += 1
        return self.items[self.at - 1]

    def take(self, n: int) -> list[Any]:
        batch = self.items[self.at : self.at + n]
        self.at += len(batch)
        return batch


def input_len(it: Any) -> int | None:
    try:
        return len(it)
    except TypeError:
        return None


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class MapRun:
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
        self.replicas = max(1, len(self.pool.alive))
        slots = self.replicas * mapper.concurrency
        self.chunks = chunker(opts.chunksize, slots, mapper.pace)
        self.window = 2 * slots
        self.read_ahead = READ_AHEAD * slots
        self.sink = Sink()
        self.read = 0
        self.inflight = 0
        self.exhausted = False
        self.source_error: Exception | None = None  # what reading the inputs raised, raised after the results before it
        self.ready: dict[int, list[Any]] = {}  # chunk start -> its results (or _Failure)
        self.flawed: set[int] = set()  # starts of the ready chunks that hold a _Failure
        self.retried: dict[int, int] = {}  # input index -> re-runs after its user code raised
        self.checkpoint: Checkpoint | None = None
        if opts.checkpoint is not None:
            from runmap.mapper.checkpoint import Checkpoint  # SQLite, imported by the maps that use it

            self.checkpoint = Checkpoint(opts.checkpoint)
        self.hashes: dict[int, str] = {}  # input index -> input hash, while in flight
        self.cancelled = False
        self.rerun = 0  # inputs run again, for the progress bar
        self.errors = 0  # failed inputs filed in their slots
        self.replaced_before = mapper.replaced
        self.bar: Any = None  # where progress goes instead of a tqdm bar (a remote Mapper's tally)

    def cancel(self) -> None:
        """Ends the map from another thread: :meth:`results` returns at once, even mid-wait."""
        self.cancelled = True
        self.sink.events.put(_WAKE)

    def results(self) -> Generator[Any, None, None]:
        """The results one by one (see :meth:`result_chunks`)."""
        chunks = self.result_chunks()
        try:
            for chunk in chunks:
                yield from chunk  # a list: no Python code runs per result
        finally:
            chunks.close()

    def result_chunks(self) -> Generator[list[Any], None, None]:
        """The results, a list at a time; a failure raises after the results before it.

        :meth:`Mapper.map` extends its list with these, so a result costs no
        Python code on the client: a chunk of ints comes out as fast as it unpickles.
        """
        bar = self.bar if self.bar is not None else Progress(self.opts.progress, self.total, _describe(self.mapper))
        next_index = 0
        # Short calls one input or a few each (a fixed chunk size): the dispatch thread beside this one.
        reader = threading.get_native_id() if isinstance(self.chunks, FixedChunks) else None
        if reader is not None:
            self.pool.reading(reader, self._short_calls)
        try:
            while not self.cancelled:
                self._fill()
                if self.ordered:
                    while next_index in self.ready:
                        start, chunk = next_index, self.ready.pop(next_index)
                        next_index += len(chunk)
                        yield from self._clean(start, chunk)
                else:
                    for start in list(self.ready):
                        yield from self._clean(start, self.ready.pop(start))
                if self.exhausted and self.inflight == 0 and not self.ready:
                    if self.source_error is not None:
                        raise self.source_error
                    return
                if self.inflight == 0:
                    continue
                try:
                    event = self.sink.events.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if event is _WAKE:
                    continue
                if type(event) is list:  # the outcomes of one read (Sink.done_many)
                    bar.update(sum(self._receive(*one) for one in event))
                else:
                    bar.update(self._receive(*event))
                bar.story(self.rerun, self.mapper.replaced - self.replaced_before, self.errors)
        finally:
            if reader is not None:
                self.pool.reading(reader, None)
            if isinstance(self.chunks, AdaptiveChunks) and self.chunks.pace is not None:
                self.mapper.pace = self.chunks.pace  # where the Mapper's next map starts
            self.sink.cancelled = True
            self.pool.tasks.discard(self.sink)
            bar.close()
            if self.checkpoint is not None:
                self.checkpoint.close()

    def _short_calls(self) -> bool:
        seconds = self.sink.seconds
        return seconds is not None and seconds < SHORT_CALL_SECONDS

    def _fill(self) -> None:
        # In flight: at most the window. Read but not yet yielded (in flight, or done
        # and waiting behind a slow input): at most READ_AHEAD chunks a slot, so that
        # other replicas keep busy behind a slow input, but memory stays bounded
        # however long it takes.
        # Short calls queued at the servlets (dispatch.py): as many more in flight. Not with
        # adaptive chunks, which grow to take far longer than a queue's worth: while they
        # are still small, reading ahead more of them would only send more small ones.
        queued = 0
        if isinstance(self.chunks, FixedChunks):
            queued = queue_depth(self.sink.seconds, self.mapper.concurrency) * self.replicas
        window, read_ahead = self.window + queued, self.read_ahead + queued
        while not self.exhausted and self.inflight < window and self.inflight + len(self.ready) < read_ahead:
            remaining = None if self.total is None else self.total - self.read
            batch = self._read(self.chunks.next_size(remaining))
            if not batch:
                self.exhausted = True
                return
            start = self.read
            self.read += len(batch)
            if self.checkpoint is None:
                self._send(batch, start)
            else:
                self._send_unsaved(batch, start)

    def _read(self, n: int) -> list[Any]:
        """The next ``n`` inputs, or fewer at their end.

        When reading raises (a generator that fails part-way), the inputs read
        before are still sent, and the error is kept to be raised once their
        results have come out, as the built-in ``map`` would have done.
        """
        if type(self.items) is ListReader:
            return self.items.take(n)
        batch: list[Any] = []
        try:
            batch.extend(islice(self.items, n))
        except Exception as exc:
            self.source_error = exc
            self.exhausted = True
        return batch

    def _send_unsaved(self, batch: list[Any], start: int) -> None:
        """Takes saved results from the checkpoint and sends only the runs of inputs without one."""
        assert self.checkpoint is not None
        from runmap.mapper.checkpoint import MISSING, Checkpoint

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
        self.inflight += 1
        self.pool.submit(Task(start, self.mode, batch, self.opts.kwargs, self.sink, self.timeout))

    def _unpicklable(self, task: Task, exc: SerializationError) -> int:
        """An input of ``task`` could not be pickled: it fails alone, and the inputs beside it go again.

        Returns how many inputs completed (the one that failed).
        """
        index = exc.index
        if index is None:  # the keyword arguments: every input would fail the same way
            raise exc
        k = index - task.start
        if k > 0:
            self._send(task.items[:k], task.start)
        if k + 1 < task.count:
            self._send(task.items[k + 1 :], index + 1)
        self._forget([index])
        self.ready[index] = [_Failure(exc)]
        self.flawed.add(index)
        self.errors += 1
        return 1

    def _receive(self, task: Task, outcome: Any, replica: str | None, seconds: float) -> int:
        """Files one event's results under their chunk; returns how many inputs completed."""
        if isinstance(outcome, Requeued):
            self.rerun += outcome.count
            return 0
        if isinstance(outcome, Split):
            self.rerun += task.count
            self.inflight += outcome.parts - 1
            return 0
        self.inflight -= 1
        if isinstance(outcome, SerializationError) and not task.payload:  # its inputs never pickled
            return self._unpicklable(task, outcome)
        if not isinstance(outcome, ser.Outcome):
            self._forget(task.indexes)
            self.ready[task.start] = [_Failure(outcome)] * task.count
            self.flawed.add(task.start)
            self.errors += task.count
            return task.count
        self.chunks.record(task.count, seconds, len(task.payload))
        results: list[Any] = outcome.results
        retry = []
        for i, err in outcome.errors.items():
            exc = _localize(err.to_exception(task.start + i, replica), task.start + i, replica)
            if self._should_retry(task.start + i, exc):
                retry.append(i)
                self.rerun += 1
            else:
                self.errors += 1
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
            if outcome.errors:
                self.flawed.add(task.start)
            return task.count
        # Re-run the inputs whose user code raised a retryable error; file the rest in pieces.
        for i, part in enumerate(task.split()):
            if i in retry:
                self.retried[part.start] = self.retried.get(part.start, 0) + 1
                self.inflight += 1
                self.pool.submit(part)
            else:
                self.ready[part.start] = [results[i]]
                if i in outcome.errors:
                    self.flawed.add(part.start)
        return task.count - len(retry)

    def _should_retry(self, index: int, exc: BaseException) -> bool:
        kinds = self.mapper.retry_exceptions
        return bool(kinds) and isinstance(exc, kinds) and self.retried.get(index, 0) < self.mapper.retries

    def _forget(self, indexes: Iterable[int]) -> None:
        if self.checkpoint is not None:
            for i in indexes:
                self.hashes.pop(i, None)

    def _clean(self, start: int, chunk: list[Any]) -> Iterator[list[Any]]:
        """The chunk as results: a failure becomes its exception, or raises after the results before it."""
        if start not in self.flawed:
            yield chunk
            return
        self.flawed.discard(start)
        good: list[Any] = []
        for value in chunk:
            if not isinstance(value, _Failure):
                good.append(value)
            elif self.opts.return_exceptions:
                good.append(value.exc)
            else:
                if good:
                    yield good
                raise value.exc
        yield good


def _localize(exc: BaseException, index: int, replica: str | None) -> BaseException:
    """A servlet's "result of input #i of its chunk" error, with the map's index and the replica."""
    if isinstance(exc, SerializationError) and exc.side == "result":
        message = re.sub(r"input #\d+ of its chunk", f"input {index}", str(exc))
        localized = SerializationError(f"{message} on {replica}", index=index, side="result", replica=replica)
        localized.__cause__ = exc.__cause__
        return localized
    return exc


def _describe(mapper: Mapper) -> str:
    return mapper.method or mapper._prototype.module_name.rsplit("-", 1)[0]
