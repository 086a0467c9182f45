"""The replicas of a Mapper and what feeds them.

    Mapper.map ──► TaskQueue ──► dispatch thread (dispatch.py): one framed connection
                   (shared)      per replica, ``concurrency`` calls in flight on each
                      ▲                 │           ──► servlet ──► Sink of the task
                      └── re-queued ◄───┘ when the replica died under the task

The dispatch thread sends the next task to whichever replica has room, so a
slow input never holds back inputs another replica could take, and a replica
never has more than ``concurrency`` calls in flight. A replica whose servlet
cannot carry several calls on one connection (an in-process test servlet, a
servlet of an older runmap) gets slot threads instead: ``concurrency`` threads,
one blocking channel each, pulling from the same queue (they do not run a
task that was lost with a replica alone, as the dispatch thread does).

A replica that dies is retired at once: it gets no more tasks, the tasks it
lost go back to the front of the queue (at-least-once), and the pool asks
its owner for a replacement. When no replica is left and none is coming, the
pool is *broken*: every queued and future task fails with a
``ReplicaDiedError`` that says what happened to each replica.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

from runmap import _threads, registry
from runmap import serialization as ser
from runmap.cluster.process import ExitStatus
from runmap.exceptions import ReplicaDiedError, ReplicaError, ReplicaTimeoutError, SerializationError
from runmap.mapper.dispatch import Dispatcher, Lane
from runmap.mapper.liveness import DEFAULT_LIVENESS_TIMEOUT, LivenessMonitor, probe
from runmap.mapper.provider import ReplicaProvider
from runmap.mapper.tasks import Outcomed, Task, TaskQueue
from runmap.module import Remote
from runmap.servlet import Servlet
from runmap.transport.base import Channel
from runmap.transport.http import FramesRefused, status_error

EXIT_WAIT = 1.0  # how long to wait for a dead replica's exit code
PROBE_TIMEOUT = 2.0  # how long a replica whose call timed out has to answer a health probe


@dataclass(eq=False)
class Replica:
    """A Mapper's view of one replica: the remote module, where it came from, and its slots."""

    remote: Remote
    owned: bool
    provider: ReplicaProvider
    retired: bool = False
    frozen: bool = False  # retired for not answering health probes
    timed_out: bool = False  # killed because a call outlived its timeout (while answering probes)
    reason: str = ""
    slots: list[threading.Thread] = field(default_factory=list)  # only if it has no lane
    channels: list[Union[Channel, Lane]] = field(default_factory=list)  # noqa: UP007 - what retiring it aborts

    @property
    def name(self) -> str:
        return self.remote.name


class ReplicaPool:
    """Replicas, their slot threads, and what happens when one dies.

    Args:
        method: the method called on every replica (None for a function).
        concurrency: calls in flight per replica.
        retries: how often one task may be re-run after replicas died under it.
        on_lost: called with a retired replica, to start a replacement; it
            returns whether one is coming (and must then call :meth:`add` or
            :meth:`replacement_failed`).
        liveness_timeout: seconds a replica may go without answering a health
            probe before it is killed as frozen (None: never probe).
    """

    def __init__(
        self,
        method: str | None,
        concurrency: int,
        retries: int,
        on_lost: Callable[[Replica], bool],
        liveness_timeout: float | None = DEFAULT_LIVENESS_TIMEOUT,
    ) -> None:
        self.method = method
        self.concurrency = concurrency
        self.retries = retries
        self.on_lost = on_lost
        self.tasks = TaskQueue()
        self.replicas: list[Replica] = []
        self._lock = threading.Lock()
        self._pending_replacements = 0
        self._broken: ReplicaDiedError | None = None
        self._closing = False
        self.liveness_timeout = liveness_timeout
        self._liveness = LivenessMonitor(self, liveness_timeout) if liveness_timeout else None
        self._dispatcher: Dispatcher | None = None  # started with the first lane

    # -------------------------------------------------------------- replicas

    def add(self, remote: Remote, owned: bool) -> Replica:
        replica = Replica(remote, owned, ReplicaProvider(remote.servlet.cluster))
        sock = _framed_connection(remote, self.concurrency)
        with self._lock:
            if self._closing:
                if sock is not None:
                    sock.close()
                raise ReplicaDiedError("the Mapper is closed", remote.name)
            self.replicas.append(replica)
            self._broken = None
            # Started under the lock: a close() that sees this replica stops every one of its slots.
            if sock is not None:
                self._attach_lane(replica, sock)
            else:
                for i in range(self.concurrency):
                    slot = threading.Thread(
                        target=self._run_slot, args=(replica,), name=f"runmap-slot-{replica.name}-{i}", daemon=True
                    )
                    replica.slots.append(slot)
                    slot.start()
        # Noticed at once, even while idle: the replica leaves rotation before an input needs it.
        remote.servlet.on_exit(self._watched_exit)
        return replica

    def _watched_exit(self, servlet: Servlet) -> None:
        with self._lock:
            mine = [r for r in self.replicas if r.remote.servlet is servlet and not r.retired]
        for replica in mine:
            self.retire_dead(replica)

    def expect_replacements(self, n: int) -> None:
        with self._lock:
            self._pending_replacements += n

    def replacement_done(self) -> None:
        with self._lock:
            self._pending_replacements -= 1

    def replacement_failed(self, reason: str) -> None:
        with self._lock:
            self._pending_replacements -= 1
            self._check_broken(reason)

    @property
    def alive(self) -> list[Replica]:
        with self._lock:
            return [r for r in self.replicas if not r.retired]

    # ----------------------------------------------------------------- tasks

    def reading(self, native_id: int, short: Callable[[], bool] | None) -> None:
        """Thread ``native_id`` begins reading a map's results, whose calls are short while ``short()``,
        or ends (None): the dispatch thread runs beside it meanwhile (runmap/mapper/colocate.py)."""
        dispatcher = self._dispatcher
        if dispatcher is None:
            return
        if short is None:
            dispatcher.cpu.unfollow(native_id)
        else:
            dispatcher.cpu.follow(native_id, short)

    def submit(self, task: Task, front: bool = False) -> None:
        broken = self._broken  # one read of one attribute: no lock needed
        if broken is not None:
            task.sink.failed(task, broken)
        else:
            self.tasks.put(task, front)

    def _run_slot(self, replica: Replica) -> None:
        try:
            channel = replica.remote.servlet.open_channel()
        except Exception as exc:  # pragma: no cover - opening is lazy for every transport
            self._retire(replica, str(exc))
            return
        with self._lock:
            replica.channels.append(channel)
        module, method = replica.remote.module_name, self.method
        try:
            while True:
                task = payload = None  # a finished task's inputs must not live on while this slot waits
                task = self.tasks.get(lambda: replica.retired)
                if task is None:
                    return
                if task.sink.cancelled:
                    continue
                try:
                    payload = task.serialized()
                except SerializationError as exc:
                    task.sink.failed(task, exc)
                    continue
                started = time.perf_counter()
                try:
                    data = channel.call(module, method, payload, task.timeout, task.in_thread)
                except ReplicaTimeoutError as exc:
                    self.timed_out(replica, task, exc)
                    return
                except ReplicaDiedError as exc:
                    self._lost(replica, task, exc)
                    return
                except Exception as exc:
                    self._failed_call(replica, task, exc)
                    continue
                self.finish(replica, task, data, started)
                del data  # a finished task's results must not live on while this slot waits
        finally:
            channel.close()

    # ------------------------------------------------------------- outcomes
    # Called by the slot threads and by the dispatch thread alike.

    def finish(self, replica: Replica, task: Task, data: bytes, started: float) -> None:
        """A call answered with ``data``, the pickled outcome of ``task``."""
        event = self.outcome_of(replica, task, data, started)
        if event is not None:
            task.sink.done(*event)

    def outcome_of(self, replica: Replica, task: Task, data: bytes, started: float) -> Outcomed | None:
        """The event of a call answered with ``data``, for its sink; None if it failed to unpickle (the sink heard)."""
        try:
            outcome = ser.load_outcome(data)
        except Exception as exc:
            task.sink.failed(
                task,
                SerializationError(
                    f"the results of inputs {_span(task)} from {replica.name} could not be "
                    f"unpickled (result): {exc!r}",
                    index=task.start,
                    side="result",
                    replica=replica.name,
                ),
            )
            return None
        return task, outcome, replica.name, time.perf_counter() - started

    def refused(self, replica: Replica, task: Task, status: int, detail: bytes) -> None:
        """The servlet refused ``task`` with ``status`` (its JSON ``detail``): the task fails."""
        self._failed_call(replica, task, status_error(replica.name, status, bytes(detail)))

    def _failed_call(self, replica: Replica, task: Task, exc: Exception) -> None:
        if isinstance(exc, SerializationError):
            exc = _name_inputs(exc, task, replica.name)
        task.sink.failed(task, exc)

    def dispatch_failed(self, exc: BaseException) -> None:
        """The dispatch thread died of a bug: no call can be sent any more, so every task fails, now and later."""
        broken = ReplicaDiedError(f"runmap's dispatch thread failed ({exc!r}): this Mapper cannot send calls")
        with self._lock:
            self._broken = broken
            queued = self.tasks.drain()
        for task in queued:
            task.sink.failed(task, broken)

    # ---------------------------------------------------------------- deaths

    def lost_calls(
        self, replica: Replica, tasks: list[Task], exc: ReplicaDiedError, unstarted: list[Task] | None = None
    ) -> None:
        """The connection to ``replica`` broke with ``tasks`` in flight on it (maybe none).

        ``unstarted``: calls that were queued at the servlet, behind ``tasks``: they
        never ran, so they run again at once, without using up a retry.
        """
        unstarted = unstarted or []
        if not tasks and not unstarted:
            self._lost_idle_connection(replica)
        for task in reversed(unstarted):
            if self._closing:
                task.sink.failed(task, exc)
            else:
                task.alone = True  # had it started after all, the next death under it is its own
                self.submit(task, front=True)
        for task in tasks:
            self._lost(replica, task, exc)

    def _lost_idle_connection(self, replica: Replica) -> None:
        """The connection of a replica with no call in flight broke.

        Its servlet ending is the likely cause, which its exit watcher reports
        with the exit's reason; a servlet still running gets a new connection.
        One that runs but can't be reached is left to the liveness monitor.
        """
        status = _exit_within(replica.remote.servlet, lambda: self._closing or replica.retired)
        if self._closing or replica.retired:
            return
        if status is not None:
            self.retire_dead(replica)
            return
        sock = _framed_connection(replica.remote, self.concurrency)
        if sock is None:
            return
        with self._lock:
            if self._closing or replica.retired:
                sock.close()
                return
            self._attach_lane(replica, sock)

    def _attach_lane(self, replica: Replica, sock: socket.socket) -> None:
        """Gives ``replica`` a lane on ``sock`` (a framed connection), starting the dispatch thread if need be.

        Holds ``_lock``.
        """
        if self._dispatcher is None or not self._dispatcher.alive:
            self._dispatcher = Dispatcher(self, self.concurrency)
            self.tasks.on_put = self._dispatcher.wake_if_idle
        replica.channels.append(self._dispatcher.add(replica, sock, self.method))

    def _lost(self, replica: Replica, task: Task, exc: ReplicaDiedError) -> None:
        if self._closing:
            task.sink.failed(task, exc)
            return
        if replica.timed_out and not replica.frozen:
            # Killed because another call on it outlived its timeout: this input did
            # nothing wrong, so it runs again at once, without using up a retry.
            self.submit(task, front=True)
            return
        if not replica.retired:
            self._retire(replica, self._death_reason(replica, exc))
        if replica.frozen:
            # A call the servlet ran on its event loop that turned long looks frozen
            # from here (the loop answers health probes): run it in a thread next time.
            task.in_thread = True
        task.attempts += 1
        task.lost_on.append(replica.name)
        # Whichever of the calls in flight killed the replica, from now on each of them runs
        # alone: the next death under one is its own, so an input that kills every replica
        # it touches cannot use up the retries of the inputs that ran beside it.
        task.alone = True
        if task.count > 1 and task.attempts <= self.retries:
            self._retry_one_by_one(task)
        elif task.attempts > self.retries:
            fates = self._fates(task.lost_on)
            message = _lost_message(task, fates)
            task.sink.failed(task, ReplicaDiedError(message, replica.name, replicas=fates, inputs=list(task.indexes)))
        else:
            task.sink.requeued(task)
            self.submit(task, front=True)

    def timed_out(self, replica: Replica, task: Task, exc: ReplicaTimeoutError) -> None:
        """A call of ``task`` on ``replica`` outlived its timeout (its answer, if any comes, is ignored)."""
        if not replica.timed_out and not self._answers(replica):
            # A frozen replica, not a slow input: the replica failed, so the input is retried.
            self.retire_frozen(replica, f"stopped answering during a call of {task.timeout:g} s (frozen?)")
            self._lost(replica, task, ReplicaDiedError(f"{replica.name} stopped answering", replica.name))
            return
        # Python can't stop the thread running the call: the replica has to go. Only this
        # input is charged: the other calls in flight on it run again as if nothing happened
        # (see _lost). A second call that outlived its own timeout meanwhile is charged too.
        replica.timed_out = True
        self._retire(replica, f"killed after a call outlived its timeout of {task.timeout:g} s", kill=True)
        if task.count > 1:
            self._retry_one_by_one(task)  # which input was slow is unknown: each gets the full timeout
            return
        task.sink.failed(task, ReplicaTimeoutError(f"input {task.start}: {exc}", replica.name))

    def _retry_one_by_one(self, task: Task) -> None:
        """Re-queues ``task`` at the front as one task per input, so a bad input fails alone."""
        parts = task.split()
        task.sink.split(task, parts)
        for part in reversed(parts):
            self.submit(part, front=True)

    def _death_reason(self, replica: Replica, exc: ReplicaDiedError) -> str:
        status = _exit_within(replica.remote.servlet)
        return f"unreachable ({exc})" if status is None else _fate(status)

    def _answers(self, replica: Replica) -> bool:
        """Whether ``replica`` answers a health probe now (on a connection of its own)."""
        channel = replica.remote.servlet.open_channel()
        try:
            return probe(channel, PROBE_TIMEOUT)
        finally:
            channel.close()

    def retire_frozen(self, replica: Replica, reason: str) -> None:
        """Kills and retires a replica that is running but does not answer; its calls run again elsewhere."""
        replica.frozen = True
        self._retire(replica, reason, kill=True)

    def retire_dead(self, replica: Replica) -> None:
        """Retires a replica whose servlet has ended, noticed while it may have been idle."""
        status = _exit_within(replica.remote.servlet)  # its exit may still be being collected
        self._retire(replica, "ended" if status is None else _fate(status))

    def _retire(self, replica: Replica, reason: str, kill: bool = False) -> None:
        with self._lock:
            if replica.retired:
                return
            replica.retired = True
            replica.reason = reason
            closing = self._closing
        self.tasks.wake_all()
        for channel in list(replica.channels):
            channel.abort()
        replica.remote.servlet.forget_watcher(self._watched_exit)
        replica.provider.release(replica.remote, replica.owned, kill=kill)
        if closing:
            return
        coming = self.on_lost(replica)
        with self._lock:
            if not coming:
                self._check_broken(reason)

    def _check_broken(self, last_reason: str) -> None:
        """Breaks the pool if no replica is left and none is coming. Holds ``_lock``."""
        if self._pending_replacements > 0 or any(not r.retired for r in self.replicas):
            return
        described = {r.name: r.reason for r in self.replicas}
        queued = self.tasks.drain()
        inputs = sorted(i for t in queued for i in t.indexes)
        closed = {r.remote.servlet.cluster.closed_reason for r in self.replicas} - {None}
        why = f"its cluster was {', '.join(sorted(closed))}, so " if closed else ""  # type: ignore[arg-type]
        self._broken = ReplicaDiedError(
            f"{why}no replica is left: " + "; ".join(f"{n}: {r}" for n, r in described.items()),
            replicas=described,
            inputs=inputs,
        )
        for task in queued:
            task.sink.failed(task, self._broken)

    def _fates(self, names: list[str]) -> dict[str, str]:
        """What became of each of the replicas ``names``, in order."""
        with self._lock:
            reasons = {r.name: r.reason for r in self.replicas}
        return {name: reasons.get(name) or "lost" for name in dict.fromkeys(names)}

    # --------------------------------------------------------------- closing

    def close(self, timeout: float = 5.0) -> None:
        """Stops the slots (calls in flight are abandoned) and gives every replica back to its provider."""
        with self._lock:
            self._closing = True
            replicas = list(self.replicas)
        for replica in replicas:
            replica.remote.servlet.forget_watcher(self._watched_exit)
        if self._liveness is not None:
            self._liveness.close()
        self.tasks.close()
        # Work that never started must still get an answer: a future or a map
        # waiting on it would otherwise wait forever.
        closed = ReplicaDiedError("the Mapper was closed before this input ran")
        for task in self.tasks.drain():
            task.sink.failed(task, closed)
        deadline = time.monotonic() + timeout
        if self._dispatcher is not None:
            self._dispatcher.close(timeout)  # calls in flight on lanes fail as abandoned
        for replica in replicas:
            for channel in list(replica.channels):
                channel.abort()
        for replica in replicas:
            for slot in replica.slots:
                if slot is not threading.current_thread():
                    slot.join(max(0.0, deadline - time.monotonic()))

    def release_owned(self) -> None:
        """Ends the replicas the Mapper started that are still running (after :meth:`close`).

        All at once: each takes a round of its process's exit, which the others need not wait for.
        """
        owned = [r for r in self.replicas if r.owned and not r.retired]
        with registry.batch():  # each stop would write its cluster's entry again
            _threads.each(lambda r: r.provider.release(r.remote, owned=True), owned, "runmap-stop")


def _exit_within(servlet: Servlet, stop: Callable[[], bool] = lambda: False) -> ExitStatus | None:
    """How ``servlet`` ended, waiting up to ``EXIT_WAIT`` for it (or until ``stop()``); None if it still runs."""
    deadline = time.monotonic() + EXIT_WAIT
    status = servlet.exit_status()
    while status is None and time.monotonic() < deadline and not stop():
        time.sleep(0.02)
        status = servlet.exit_status()
    return status


def _fate(status: ExitStatus) -> str:
    """A replica's fate, as errors name it: ``died: SIGKILL(-9)``, or how it otherwise ended."""
    return f"died: {status}" if status.crashed else str(status)


def _framed_connection(remote: Remote, concurrency: int) -> socket.socket | None:
    """A connection to ``remote``'s servlet switched to call frames, for a lane; None if it can't have one.

    None for a channel that is not a socket (in-process test servlets), a servlet
    that refuses frames of this version, or one that cannot be reached now: its
    slot threads' first calls then fail over as any call to a dead replica does.
    """
    channel = remote.servlet.open_channel()
    open_framed = getattr(channel, "open_framed", None)  # only a socket channel has one
    try:
        return open_framed(concurrency) if open_framed is not None else None
    except (FramesRefused, ReplicaError):
        return None
    finally:
        channel.close()


def _span(task: Task) -> str:
    return str(task.start) if task.count == 1 else f"{task.start}-{task.start + task.count - 1}"


def _lost_message(task: Task, fates: dict[str, str]) -> str:
    """``input 7 was lost twice, each time with the replica running it: a (died: SIGKILL(-9)), b (...)``."""
    what, it = (f"input {task.start} was", "it") if task.count == 1 else (f"inputs {_span(task)} were", "them")
    replicas = ", ".join(f"{name} ({fate})" for name, fate in fates.items())
    if task.attempts == 1:
        return f"{what} lost with the replica running {it}: {replicas}"
    times = "twice" if task.attempts == 2 else f"{task.attempts} times"
    return f"{what} lost {times}, each time with the replica running {it}: {replicas}"


def _name_inputs(exc: SerializationError, task: Task, replica: str) -> SerializationError:
    """A servlet-side unpickling error, reworded with the chunk's input indexes."""
    side = exc.side or "argument"
    return SerializationError(
        f"inputs {_span(task)} could not be unpickled on {replica} ({side}): {exc}",
        index=task.start,
        side=side,
        replica=replica,
    )
