"""The Mapper's half that runs on the cluster, when a Mapper is placed there (:meth:`Mapper.to`).

    client                                  one servlet on the cluster
    RemoteMapper ── open / exchange ──────► MapperService
      (remote.py)   (inputs up, results       └── Mapper ──► replicas, started by the
                     and progress back, in          cluster as seen from inside
                     bounded windows)               (Cluster.from_inside)

A map is a :class:`_Session`: the client feeds its inputs into an inbox no
larger than the window it was granted, a thread here runs an ordinary
:class:`~runmap.mapper.run.MapRun` over them, and its results wait in a
bounded outbox until the client takes them. A client that stops feeding and
taking stops the map; a client that is gone (no call for ``lease`` seconds)
has its maps cancelled and the replicas released.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from runmap import serialization as ser
from runmap.cluster.base import Cluster
from runmap.exceptions import ClusterError
from runmap.mapper.mapper import Mapper
from runmap.mapper.run import MapRun

WINDOW = 2048  # inputs a client may have fed that the map has not yet taken (plus one batch it reads)
RESULTS_PER_EXCHANGE = 4096
EXCHANGE_BYTES = 8 << 20  # about this many pickled bytes of inputs, or of results, per exchange
GROWTH = 8  # an exchange carries at most this many times the items of the one before
_END = object()


class Sizer:
    """How many items the next exchange may carry, so that it holds about ``EXCHANGE_BYTES``.

    Counts alone would let 2,048 inputs of 10 MB go up in one exchange: the first
    exchange of a map carries one item, and each later one as many as fit by the
    pickled size per item of the one before, growing at most ``GROWTH`` times an exchange
    (a first item smaller than the rest must not open the gates). Used on both sides:
    the client for inputs, the service for results.
    """

    def __init__(self, most: int) -> None:
        self.most = most
        self._last = 0  # items the last exchange carried
        self._per_item = 0.0

    def next(self) -> int:
        if not self._last:
            return 1
        fit = int(EXCHANGE_BYTES / max(self._per_item, 1.0))
        return max(1, min(self.most, GROWTH * self._last, fit))

    def measured(self, count: int, size: int) -> None:
        if count:
            self._last, self._per_item = count, size / count

    def dumps(self, items: list[Any]) -> bytes:
        """``items`` pickled, their size measured for the next exchange."""
        data = ser.dumps(items)
        self.measured(len(items), len(data))
        return data


@dataclass
class Tally:
    """A progress bar's counts, kept where the map runs and read by the client's bar."""

    done: int = 0
    retried: int = 0
    replaced: int = 0
    errors: int = 0

    def update(self, n: int) -> None:
        self.done += n

    def story(self, retried: int, replaced: int, errors: int) -> None:
        self.retried, self.replaced, self.errors = retried, replaced, errors

    def close(self) -> None:
        pass


@dataclass
class Reply:
    """What one exchange hands back: results in order, progress, room for more inputs, and whether it ended."""

    results: bytes  # the pickled list of results (Sizer.dumps)
    tally: Tally
    credit: int
    finished: bool = False
    error: BaseException | None = None  # what ended the map, raised by the client after the results
    replicas: list[str] = field(default_factory=list)


class _Session:
    """One map on the service: an inbox of inputs, a thread running it, an outbox of results."""

    def __init__(self, mapper: Mapper, map_id: str, mode: int, total: int | None, options: dict[str, Any],
                 ordered: bool) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.outbox: deque[tuple[str, Any]] = deque()
        self.changed = threading.Condition()  # results came out, or room for inputs opened
        self.fed = 0
        self.read = 0
        self.end_fed = False
        self.taker_waiting = False
        self.sizer = Sizer(RESULTS_PER_EXCHANGE)
        self.tally = Tally()
        self.cancelled = False
        self.run: MapRun | None = None
        # Built and read on its own thread: a checkpoint's database is used by the thread that opened it.
        start = functools.partial(mapper._start, mode, self._inputs(), total, {**options, "progress": False}, ordered)
        self.thread = threading.Thread(
            target=self._drain, args=(start,), name=f"runmap-remote-map-{map_id}", daemon=True
        )
        self.thread.start()

    def _inputs(self) -> Iterator[Any]:
        while True:
            batch = self.inbox.get()
            if batch is _END:
                return
            with self.changed:
                self.read += len(batch)
                if self.credit() >= WINDOW // 2:  # room for a good batch: wake a client waiting to send it
                    self.changed.notify_all()
            yield from batch

    def _drain(self, start: Callable[[], MapRun]) -> None:
        try:
            run = start()
            run.bar = self.tally
            with self.changed:
                self.run = run
                if self.cancelled:
                    run.cancel()
            for value in run.results():
                self._put(("ok", value))
            self._put(("end", None))
        except BaseException as exc:  # the map's own error: the client raises it after the results before it
            self._put(("error", exc))

    def _put(self, entry: tuple[str, Any]) -> None:
        if len(self.outbox) >= 2 * self.sizer.next():
            with self.changed:
                # A client that takes no results stops the map here: its outbox holds two exchanges' worth.
                self.changed.wait_for(lambda: self.cancelled or len(self.outbox) < 2 * self.sizer.next())
        self.outbox.append(entry)  # without the lock: one result is cheap; a waiting taker is woken below
        if self.taker_waiting:
            with self.changed:
                self.changed.notify_all()

    def feed(self, items: list[Any], end: bool) -> None:
        if items:
            self.inbox.put(items)
        with self.changed:
            self.fed += len(items)
            self.end_fed = self.end_fed or end
        if end:
            self.inbox.put(_END)

    def take(self, wait: float) -> tuple[bytes, bool, BaseException | None]:
        """The results ready (pickled), waiting up to ``wait`` s for one, or for room for more inputs."""
        results: list[Any] = []
        finished, error = False, None
        with self.changed:
            self.taker_waiting = True  # before looking: a result appended after this wakes it
            self.changed.wait_for(
                lambda: self.outbox or self.cancelled or (not self.end_fed and self.credit() >= WINDOW // 2), wait
            )
            self.taker_waiting = False
            most = self.sizer.next()
            while self.outbox and len(results) < most:
                tag, value = self.outbox.popleft()
                if tag != "ok":
                    finished, error = True, value
                    break
                results.append(value)
            self.changed.notify_all()
        return self.sizer.dumps(results), finished, error

    def credit(self) -> int:
        return max(0, WINDOW - (self.fed - self.read))

    def cancel(self) -> None:
        with self.changed:
            self.cancelled = True
            self.changed.notify_all()
            if self.run is not None:
                self.run.cancel()
        self.inbox.put(_END)


class MapperService:
    """A Mapper in a servlet on the cluster, driven by a client's :class:`~runmap.mapper.remote.RemoteMapper`.

    Args:
        target: the function to map, pickled by the client (by value where the cluster lacks its files).
        method, options: what the client's ``rm.mapper(...)`` was given.
        make_cluster: the cluster this servlet runs on, seen from inside it
            (:meth:`runmap.cluster.base.Cluster.from_inside`): the replicas start there.
        lease: seconds without a call from the client after which its maps are
            cancelled and the replicas released (the default is :meth:`Mapper.to`'s).
    """

    def __init__(self, target: bytes, method: str | None, options: dict[str, Any],
                 make_cluster: Callable[[], Cluster], lease: float) -> None:
        self.cluster = make_cluster()
        try:
            self.mapper = Mapper(ser.loads(target), method, cluster=self.cluster, **options).start()
        except BaseException:
            self.cluster.close()
            raise
        self.lease = lease
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._last_seen = time.monotonic()
        self._ended: str | None = None
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._keep_lease, name="runmap-remote-lease", daemon=True)
        self._watch.start()

    # ---------------------------------------------------------- the client's calls

    def keepalive(self) -> list[str]:
        """The client is still there; answers with the replicas in rotation (name@host)."""
        self._seen()
        return [f"{r.name}@{r.servlet.host}" for r in self.mapper.replicas]

    def open(self, mode: int, total: int | None, options: dict[str, Any], ordered: bool) -> tuple[str, int]:
        """Starts a map; returns its id and how many inputs the client may send at first."""
        self._seen()
        map_id = str(next(self._ids))
        session = _Session(self.mapper, map_id, mode, total, options, ordered)
        with self._lock:
            self._sessions[map_id] = session
        return map_id, session.credit()

    def exchange(self, map_id: str, items: bytes, end: bool, wait: float) -> Reply:
        """Feeds inputs (a pickled list), then takes the results ready (waiting up to ``wait`` s for the first)."""
        self._seen()
        session = self._session(map_id)
        session.feed(ser.loads(items), end)
        results, finished, error = session.take(wait)
        if finished:
            with self._lock:
                self._sessions.pop(map_id, None)
        tally = Tally(session.tally.done, session.tally.retried, session.tally.replaced, session.tally.errors)
        return Reply(results, tally, session.credit(), finished, error)

    def maps(self) -> list[str]:
        """The ids of the maps running now."""
        self._seen()
        with self._lock:
            return list(self._sessions)

    def cancel(self, map_id: str) -> None:
        self._seen()
        with self._lock:
            session = self._sessions.pop(map_id, None)
        if session is not None:
            session.cancel()

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One call on the next free replica."""
        self._seen()
        self._check()
        return self.mapper.call(*args, **kwargs)

    def close(self, why: str = "its client closed it") -> None:
        """Cancels the maps, ends the replicas and the cluster seen from inside. Safe to call twice."""
        with self._lock:
            if self._ended is not None:
                return
            self._ended = why
            sessions, self._sessions = list(self._sessions.values()), {}
        self._stop.set()
        for session in sessions:
            session.cancel()
        self.mapper.close()
        self.cluster.close()

    # ------------------------------------------------------------ the lease

    def _seen(self) -> None:
        self._last_seen = time.monotonic()

    def _check(self) -> None:
        if self._ended is not None:
            raise ClusterError(f"this Mapper on the cluster has ended: {self._ended}")

    def _session(self, map_id: str) -> _Session:
        self._check()
        with self._lock:
            session = self._sessions.get(map_id)
        if session is None:
            raise ClusterError(f"map {map_id} is not running on this Mapper (it ended, or was cancelled)")
        return session

    def _keep_lease(self) -> None:
        while not self._stop.wait(min(1.0, self.lease / 4)):
            if time.monotonic() - self._last_seen > self.lease:
                self.close(f"its client was not heard from for {self.lease:g} s")
                return
