"""The dispatch thread: every replica's calls, on one connection per replica, from one thread.

    TaskQueue ──► dispatch thread ──► lane: one framed connection per replica,
    (shared)      (a selector)        ``concurrency`` calls running on it (more
        ▲              │              queued), told apart by call id (transport/framing.py)
        │              ├──► the task's Sink, with its outcome
        └──────────────┴──► the pool's failover (another thread), when a replica
                            died or a call outlived its timeout

A map of short calls keeps more than ``concurrency`` calls sent to a lane: the
servlet runs ``concurrency`` of them and queues the rest in order
(server/frames.py), so that it never waits a round trip for its next call, as a
``Pool``'s workers never wait for theirs. How many more depends on how long
that map's calls have taken so far (:func:`queue_depth`): a map starts with
``concurrency`` a lane, and long calls are never queued at one replica while
another could run them. Every lane gets its running calls before any queues
more. A queued call's timeout starts when it becomes one of the lane's
running calls, and a queued call lost with its replica never ran: it runs
again without being charged with the death.

Calls queued at one replica can turn out long (a map whose first inputs were
quick): when a lane runs dry with no task left to send while another still has
calls queued, it takes half the difference back from the fullest one (a
withdrawal frame; the servlet hands back those it had not started) and runs
them itself, as a work-stealing pool would. One such rebalance is under way
at a time.

A call lost with its replica runs alone from then on (``Task.alone``): it goes
only to a lane with nothing in flight, and that lane takes no other call until
it answers, so whichever call killed the replica, the next death under each is
its own. And a replica's exit can be heard of before the answers it wrote are
read (through an SSH tunnel they come later still): a retired replica's lane
reads on until its connection ends (``ENDING_GRACE`` at most), so that a call
that answered is never charged with the death.

One thread serves every replica, however many slots (replicas × concurrency)
there are: a Mapper of 64 replicas × 16 calls has one dispatch thread, not
1,024 threads each waiting on a socket. The thread sends the next task as soon
as a replica has room, so several frames often leave in one ``sendmsg``, and
several answers arrive in one ``recv``: a small call costs a share of a system
call rather than two, and no thread hand-off beyond the one to the map's reader.

What can block runs elsewhere: working out why a replica died, killing one whose
call timed out, starting a replacement (the pool's :meth:`lost_calls` and
:meth:`timed_out`) run in short-lived threads, so one dead replica never holds
up the calls of the others. Sinks run here: a ``Future``'s callbacks (``submit``)
run on this thread, as they run on :class:`~concurrent.futures.ProcessPoolExecutor`'s
management thread, and must be short.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runmap.exceptions import ReplicaDiedError, ReplicaTimeoutError, SerializationError
from runmap.mapper.colocate import CpuFollower
from runmap.transport.framing import (
    IN_THREAD,
    KEPT,
    MAX_CALL_ID,
    WITHDRAWN,
    CallHead,
    ResponseReader,
    withdraw_frame,
)

if TYPE_CHECKING:
    from runmap.mapper.pool import Replica, ReplicaPool
    from runmap.mapper.tasks import Outcomed, Sink, Task

log = logging.getLogger(__name__)

SMALL_BODY = 64 << 10  # up to this, a frame's head and body are joined into one buffer
MAX_IOV = 64  # buffers per sendmsg
PIPELINE_DEPTH = 32  # calls a lane keeps sent, running and queued, for a map of short calls (measured:
# 2 replicas of trivial calls level off at ~32 a lane; at 4, none queued, they ran at half the rate)
PIPELINE_SECONDS = 0.01  # ... so long as the queued ones take about this long in all, by the map's average
LEARN = 0.2  # weight of the latest call in that average
ENDING_GRACE = 2.0  # how long a retired replica's connection has to bring its last answers and end


def _in_company(task: Task) -> bool:
    """Whether ``task`` may be sent to a lane that has calls in flight."""
    return not task.alone


def _send(lane: Lane, task: Task) -> None:
    """Sends ``task`` on ``lane``; a task whose inputs can't be pickled fails instead (its map splits it)."""
    try:
        lane.send(task)
    except SerializationError as exc:
        task.sink.failed(task, exc)


def _pickle_ahead(task: Task) -> None:
    """Pickles a queued task while the lanes are full, so it goes out the moment one has room."""
    try:
        task.serialized()
    except SerializationError:
        pass  # it fails when it is sent, as a task pickled then would


def queue_depth(seconds: float | None, concurrency: int) -> int:
    """Calls a lane may queue beyond ``concurrency`` for a map whose calls take ``seconds`` (None: not known yet)."""
    if seconds is None:
        return 0
    return max(0, min(PIPELINE_DEPTH - concurrency, int(PIPELINE_SECONDS / max(seconds, 1e-6))))


@dataclass(eq=False, slots=True)
class _Call:
    task: Task
    started: float  # when it became one of the lane's running calls (queued ones: when sent)
    deadline: float | None  # armed when it starts running
    running: bool = False
    withdrawing: bool = False  # asked back from the servlet, which has not said yet whether it had started


class Lane:
    """One replica's framed connection, and the calls in flight on it (touched by the dispatch thread only).

    Its :meth:`abort` may be called from any thread: the pool aborts the
    lanes of a replica it retires, as it aborts channels.
    """

    def __init__(self, dispatcher: Dispatcher, replica: Replica, sock: socket.socket, method: str | None) -> None:
        self.dispatcher = dispatcher
        self.replica = replica
        self.sock = sock
        self.reader = ResponseReader()
        self.inflight: dict[int, _Call] = {}  # in the order sent
        self.waiting: deque[int] = deque()  # ids of the calls queued at the servlet, oldest first
        self.running = 0  # the oldest calls in flight, at most ``concurrency``: those the servlet may be running
        self.withdrawing = 0  # queued calls asked back, not yet heard of
        self.out: deque[memoryview] = deque()
        self.writing = False  # registered for EVENT_WRITE: the socket's buffer was full
        self.closed = False
        self.draining = False  # a call timed out: the replica is on its way out, so it takes no more
        self.alone = False  # it runs a call that must have no other beside it (Task.alone)
        self._ids = itertools.count(1)
        self._token = replica.remote.servlet.endpoint.token.encode()
        self._head = CallHead(
            self._token,
            replica.remote.module_name.encode(),
            (method or "__call__").encode(),
        )

    def abort(self) -> None:
        self.dispatcher.abort(self)

    def send(self, task: Task) -> None:
        """Queues ``task``'s frame for the socket.

        Raises:
            SerializationError: the task's inputs could not be pickled (nothing was queued).
        """
        payload = task.serialized()
        call_id = next(self._ids) % MAX_CALL_ID or next(self._ids)
        head = self._head(len(payload), IN_THREAD if task.in_thread else 0, call_id)
        now = time.perf_counter()
        call = self.inflight[call_id] = _Call(task, now, None)
        if task.alone:
            self.alone = True
        if self.running < self.dispatcher.concurrency:
            self._start(call_id, call, now)
        else:
            self.waiting.append(call_id)
        if len(payload) <= SMALL_BODY:
            self.out.append(memoryview(head + payload))
        else:
            self.out.append(memoryview(head))
            self.out.append(memoryview(payload))

    def answered(self, call_id: int) -> _Call | None:
        """The call ``call_id`` answered (None: one that timed out already); the oldest queued one starts."""
        call = self.inflight.pop(call_id, None)
        if call is None:
            return None
        if not self.inflight:
            self.alone = False
        if call.withdrawing:  # it had started: the servlet's "kept" comes, or came, for nothing
            call.withdrawing = False
            self.withdrawing -= 1
        now = time.perf_counter()
        if call.running:
            self.running -= 1
            sink = call.task.sink  # the map learns how long its calls take
            seconds = now - call.started
            sink.seconds = seconds if sink.seconds is None else sink.seconds + LEARN * (seconds - sink.seconds)
        else:
            self.waiting.remove(call_id)  # refused before it started (a malformed frame)
        self._start_waiting(now)
        return call

    def _start_waiting(self, now: float) -> None:
        """The oldest queued calls, as many as there is room for, may run from now on."""
        concurrency = self.dispatcher.concurrency
        while self.waiting and self.running < concurrency:
            queued = self.waiting.popleft()
            self._start(queued, self.inflight[queued], now)

    def withdraw(self, count: int) -> None:
        """Asks the servlet for the newest ``count`` queued calls back (each is answered WITHDRAWN or KEPT)."""
        for call_id in reversed(self.waiting):
            if count <= 0:
                return
            call = self.inflight[call_id]
            if not call.withdrawing:
                call.withdrawing = True
                self.withdrawing += 1
                self.out.append(memoryview(withdraw_frame(self._token, call_id)))
                count -= 1

    def taken_back(self, call_id: int, status: int) -> Task | None:
        """The servlet's word on a withdrawal: the task it handed back (None: it kept the call, or it ended)."""
        call = self.inflight.get(call_id)
        if call is None or not call.withdrawing:
            return None
        call.withdrawing = False
        self.withdrawing -= 1
        if status != WITHDRAWN:
            return None
        del self.inflight[call_id]
        if call.running:
            # Counted as running once an answer before it came, but the servlet had not
            # started it yet: it parses a whole read before it starts any call in it.
            self.running -= 1
            self._start_waiting(time.perf_counter())
        else:
            self.waiting.remove(call_id)
        return call.task

    def expired(self, call_id: int) -> _Call:
        """A running call past its deadline: the replica goes, so the queued calls stay queued."""
        call = self.inflight.pop(call_id)
        self.running -= 1
        self.draining = True
        return call

    def lost(self) -> tuple[list[Task], list[Task]]:
        """Forgets every call in flight: those that may have run, and those that never started."""
        calls, self.inflight = list(self.inflight.values()), {}
        self.waiting.clear()
        self.alone = False
        self.running = 0
        self.withdrawing = 0
        return [c.task for c in calls if c.running], [c.task for c in calls if not c.running]

    def _start(self, call_id: int, call: _Call, now: float) -> None:
        call.running = True
        call.started = now
        self.running += 1
        timeout = call.task.timeout
        if timeout is not None:
            call.deadline = now + timeout
            self.dispatcher.watch_deadline(call.deadline, self, call_id)


class Dispatcher:
    """The thread that sends a pool's tasks to its lanes and hands their answers on.

    Args:
        pool: the replicas and the task queue; its :meth:`~ReplicaPool.finish`,
            :meth:`~ReplicaPool.refused`, :meth:`~ReplicaPool.lost_calls` and
            :meth:`~ReplicaPool.timed_out` decide what an answer or a failure means.
        concurrency: calls in flight per lane.
    """

    def __init__(self, pool: ReplicaPool, concurrency: int) -> None:
        self.pool = pool
        self.concurrency = concurrency
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lanes: list[Lane] = []
        self._lock = threading.Lock()
        self._added: list[Lane] = []
        self._aborted: list[Lane] = []
        self._deadlines: list[tuple[float, int, Lane, int]] = []  # a heap: (deadline, tie, lane, call id)
        self._tie = itertools.count()
        self._sleeping = False
        self._stopping = False
        self._failover: list[threading.Thread] = []
        self._ending: dict[Lane, float] = {}  # retired lanes waiting for their connection's end, until when (_end)
        self.cpu = CpuFollower()  # beside the threads reading maps' results (colocate.py)
        self._thread = threading.Thread(target=self._run, name="runmap-dispatch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------ from any thread

    def add(self, replica: Replica, sock: socket.socket, method: str | None) -> Lane:
        lane = Lane(self, replica, sock, method)
        with self._lock:
            self._added.append(lane)
        self._wake()
        return lane

    def abort(self, lane: Lane) -> None:
        with self._lock:
            self._aborted.append(lane)
        self._wake()

    @property
    def alive(self) -> bool:
        """Whether the thread still dispatches (it ends when closed, or on a bug)."""
        return self._thread.is_alive() and not self._stopping

    def wake_if_idle(self) -> None:
        """Called when a task is queued: the thread looks at the queue again if it waits."""
        if self._sleeping:
            self._wake()

    def close(self, timeout: float) -> None:
        """Stops the thread; calls in flight fail as abandoned by a closed Mapper."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for thread in list(self._failover):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # its buffer is full (a wake-up is pending anyway) or it is closed (the thread is done)

    # ----------------------------------------------------- the thread's own

    def watch_deadline(self, deadline: float, lane: Lane, call_id: int) -> None:
        heapq.heappush(self._deadlines, (deadline, next(self._tie), lane, call_id))

    def _run(self) -> None:
        try:
            while not self._stopping:
                self.cpu.tick()
                if self._added or self._aborted:
                    self._take_changes()
                room = self._feed()
                timeout = self._expire() if self._deadlines else None
                if self._ending:
                    ending = self._drop_ended()
                    if ending is not None and (timeout is None or ending < timeout):
                        timeout = ending
                # Asleep with no room, it need not hear of new tasks: an answer wakes it, and makes room.
                self._sleeping = room
                if room and self.pool.tasks:
                    timeout = 0  # a task came in meanwhile: look again at once
                ahead = None if room else self.pool.tasks.unpickled(len(self._lanes))
                events = self._selector.select(0 if ahead is not None else timeout)
                if ahead is not None and not events:
                    _pickle_ahead(ahead)
                    continue
                self._sleeping = False
                readable = []
                for key, mask in events:
                    lane = key.data
                    if lane is None:
                        self._drain_wake()
                        continue
                    if mask & selectors.EVENT_WRITE and not lane.closed:
                        self._flush(lane)
                    if mask & selectors.EVENT_READ:
                        readable.append(lane)
                if readable:
                    self._read(readable)
        except BaseException as exc:  # a bug here must not leave maps waiting forever
            log.exception("runmap's dispatch thread failed")
            self._shut()
            self.pool.dispatch_failed(exc)
        else:
            self._shut()

    def _shut(self) -> None:
        self.cpu.release()
        with self._lock:
            lanes = self._lanes + self._added
            self._added = []
        closed = ReplicaDiedError(
            "the Mapper was closed while this input ran" if self._stopping else "runmap's dispatch thread failed"
        )
        for lane in lanes:
            ran, queued = lane.lost()
            lane.closed = True
            lane.sock.close()
            for task in ran + queued:
                task.sink.failed(task, closed)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _take_changes(self) -> None:
        with self._lock:
            added, self._added = self._added, []
            aborted, self._aborted = self._aborted, []
        for lane in added:
            lane.sock.setblocking(False)
            self._selector.register(lane.sock, selectors.EVENT_READ, lane)
            self._lanes.append(lane)
        for lane in aborted:
            self._end(lane)

    def _end(self, lane: Lane) -> None:
        """A retired replica's lane: it takes the answers on their way, and fails at its connection's end.

        Its servlet may have written answers before it died that are not read
        yet (the replica's exit can be heard of first, and through an SSH tunnel
        they come later still): they are results, and a call that answered must
        not be charged with the death. A connection that does not end within
        ``ENDING_GRACE`` (a host that no longer answers) is dropped.
        """
        if lane.closed or lane in self._ending:
            return
        self._read([lane])
        if not lane.closed:
            self._ending[lane] = time.perf_counter() + ENDING_GRACE

    def _drop_ended(self) -> float | None:
        """Fails the retired lanes whose grace is over; returns the wait to the next one's end."""
        now = time.perf_counter()
        for lane, deadline in list(self._ending.items()):
            if lane.closed or deadline <= now:
                del self._ending[lane]
                self._fail(lane, ConnectionAbortedError("the replica was retired, and its connection did not end"))
        return min(self._ending.values()) - now if self._ending else None

    def _feed(self) -> bool:
        """Sends queued tasks to the lanes with room; returns whether any lane has room left.

        First every lane's running calls, then the short calls of a map queued
        behind them (:func:`queue_depth`), one a lane in turn.
        """
        tasks = self.pool.tasks
        concurrency = self.concurrency
        lanes = self._open_lanes()
        room = False
        for lane in lanes:
            inflight = lane.inflight
            while len(inflight) < concurrency and not lane.alone:
                task = tasks.get_nowait(_in_company if inflight else None)
                if task is None:
                    room = room or not tasks  # else a task to run alone waits for a lane to run dry
                    break
                if not task.sink.cancelled:
                    _send(lane, task)
            if lane.out and not lane.writing:
                self._flush(lane)  # its servlet starts now, not once the next lane's calls are pickled
        # A flush that failed closed its lane and handed its calls to the failover: a call sent to it
        # after that would be in no lane's books and no queue, and its map would wait for it forever.
        lanes = [lane for lane in lanes if not (lane.alone or lane.closed)]
        # Fewer tasks left than lanes (the end of a map): each waits for the lane that runs dry
        # first. Queued at once, the last chunks of a map went behind one replica's while the
        # other, its answer not read yet, ran dry: a third of a 20k-input map ran on one replica.
        spread = len(lanes)
        while not room and lanes:  # a call a lane in turn: a map whose calls turn long finds them spread
            for lane in list(lanes):
                queued = len(lane.inflight) - concurrency
                task = None
                if queued < PIPELINE_DEPTH - concurrency and len(tasks) >= spread:
                    task = tasks.get_nowait(
                        lambda t: not t.alone and queue_depth(t.sink.seconds, concurrency) > queued  # noqa: B023
                    )
                if task is None:
                    lanes.remove(lane)
                elif not task.sink.cancelled:
                    _send(lane, task)
        if room:
            self._rebalance(lanes)
        for lane in list(self._lanes):  # a failed flush removes its lane from the list
            if lane.out and not lane.writing:
                self._flush(lane)
        return room

    def _open_lanes(self) -> list[Lane]:
        """The lanes that take calls: not closed, nor on their way out."""
        return [lane for lane in self._lanes if not (lane.closed or lane.draining or lane.replica.retired)]

    def _rebalance(self, lanes: list[Lane]) -> None:
        """With no task left to send, lanes that ran dry take queued calls back from the fullest ones."""
        concurrency = self.concurrency
        if len(lanes) < 2 or any(lane.withdrawing for lane in lanes):
            return  # one rebalance at a time: the servlets answer withdrawals at once
        for dry in lanes:
            if len(dry.inflight) >= concurrency or dry.alone:
                continue
            donor = max(lanes, key=lambda lane: len(lane.waiting) - lane.withdrawing)
            spare = len(donor.waiting) - donor.withdrawing
            count = min(spare, (len(donor.inflight) - donor.withdrawing - len(dry.inflight)) // 2)
            if count > 0:
                donor.withdraw(count)

    def _taken_back(self, lane: Lane, call_id: int, status: int) -> None:
        """A withdrawal answered: a call handed back goes to the lane with the fewest calls in flight."""
        task = lane.taken_back(call_id, status)
        if task is None or task.sink.cancelled:
            return
        lanes = [other for other in self._open_lanes() if not other.alone]
        if lanes:
            min(lanes, key=lambda other: len(other.inflight)).send(task)
        else:
            self.pool.tasks.put(task, front=True)

    def _flush(self, lane: Lane) -> None:
        out = lane.out
        sock = lane.sock
        while out:
            try:
                sent = sock.sendmsg(list(itertools.islice(out, MAX_IOV)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(lane, exc)
                return
            while sent:
                first = out[0]
                if sent >= len(first):
                    sent -= len(first)
                    out.popleft()
                else:
                    out[0] = first[sent:]
                    sent = 0
        writing = bool(out)
        if writing != lane.writing:
            lane.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self._selector.modify(sock, events, lane)

    def _read(self, lanes: list[Lane]) -> None:
        """Takes the answers of ``lanes``; each map hears of those of one read at once (one wake-up, not one each).

        Every lane is read, and the calls its answers made room for are sent,
        before any answer is unpickled: else a servlet idles while answers are
        unpickled, and a lane whose answer is not read yet looks busy, so the
        next call queues behind another replica's.
        """
        answers: list[tuple[Lane, _Call, bytes]] = []
        try:
            for lane in lanes:
                self._receive(lane, answers)
            if answers and not self._stopping:
                self._feed()
        finally:
            done: dict[Sink, list[Outcomed]] = {}
            for lane, call, body in answers:
                event = self.pool.outcome_of(lane.replica, call.task, body, call.started)
                if event is not None:
                    done.setdefault(call.task.sink, []).append(event)
            for sink, events in done.items():
                try:
                    sink.done_many(events)
                except Exception:  # a sink that raised (a future cancelled meanwhile) must not stop the others
                    log.exception("runmap: handing on the outcome of %d calls failed", len(events))

    def _receive(self, lane: Lane, answers: list[tuple[Lane, _Call, bytes]]) -> None:
        reader = lane.reader
        while not lane.closed:
            buffer = reader.buffer()
            try:
                n = lane.sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(lane, exc)
                return
            if not n:
                self._fail(lane, ConnectionResetError("the servlet closed the connection"))
                return
            for call_id, status, body in reader.received(n):
                if status <= KEPT:
                    self._taken_back(lane, call_id, status)
                    continue
                call = lane.answered(call_id)
                if call is None:
                    continue  # the answer to a call that already timed out
                if status != 200:
                    self._deliver(lane, call, status, body)
                    continue
                answers.append((lane, call, body))
            if n < len(buffer):
                return  # the socket is drained: no need for a recv that would only say so

    def _deliver(self, lane: Lane, call: _Call, status: int, body: bytes) -> None:
        try:
            self.pool.refused(lane.replica, call.task, status, body)
        except Exception:  # a sink that raised (a future cancelled meanwhile) must not stop the others
            log.exception("runmap: handing on the outcome of inputs from %s failed", lane.replica.name)

    def _expire(self) -> float | None:
        """Calls past their deadline go to the pool's timeout handling; returns the wait to the next deadline."""
        heap = self._deadlines
        now = time.perf_counter()
        while heap:
            deadline, _, lane, call_id = heap[0]
            call = lane.inflight.get(call_id)
            if call is None or call.deadline != deadline:
                heapq.heappop(heap)  # answered, or lost with its lane
                continue
            if deadline > now:
                return deadline - now
            heapq.heappop(heap)
            lane.expired(call_id)
            replica, task = lane.replica, call.task
            exc = ReplicaTimeoutError(
                f"a call on {replica.name} did not finish within its timeout of {task.timeout:g} s", replica.name
            )
            self._aside(f"runmap-timeout-{replica.name}", functools.partial(self.pool.timed_out, replica, task, exc))
        return None

    def _fail(self, lane: Lane, exc: BaseException) -> None:
        """The lane's connection broke (or the replica was retired): its calls in flight are lost with it."""
        if lane.closed:
            return
        lane.closed = True
        try:
            self._selector.unregister(lane.sock)
        except (KeyError, ValueError):
            pass
        lane.sock.close()
        if lane in self._lanes:
            self._lanes.remove(lane)
        ran, queued = lane.lost()
        lane.out.clear()
        replica = lane.replica
        where = replica.remote.servlet.endpoint
        died = ReplicaDiedError(f"{replica.name} at {where} is unreachable: {exc!r}", replica.name)
        lost = functools.partial(self.pool.lost_calls, replica, ran, died, queued)
        self._aside(f"runmap-failover-{replica.name}", lost)

    def _aside(self, name: str, work: Callable[[], None]) -> None:
        """Runs ``work``, which may block (killing a replica, starting another), off this thread."""
        self._failover = [t for t in self._failover if t.is_alive()]
        thread = threading.Thread(target=work, name=name, daemon=True)
        self._failover.append(thread)
        thread.start()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
