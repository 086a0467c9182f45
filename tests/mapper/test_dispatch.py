"""The Mapper's dispatch: order, balance and deaths.

On the in-process transport (slot threads, no processes) and on real servlets,
where one dispatch thread keeps every replica's calls in flight on one
connection each (runmap/mapper/dispatch.py).
"""

from __future__ import annotations

import os
import random
import threading
import time
from types import SimpleNamespace

import pytest

import runmap as rm
from runmap.cluster.inprocess import InProcessCluster, InProcessServletProcess


def jittery(x: int) -> int:
    time.sleep(random.random() * 0.002)
    return x * x


def test_order_survives_random_delays(inprocess: InProcessCluster) -> None:
    remote = rm.function(jittery).to(inprocess)
    with rm.mapper(remote, num_replicas=4, concurrency=2) as mapper:
        assert mapper.map(range(500), chunksize=3, progress=False) == [x * x for x in range(500)]
        assert sorted(mapper.imap_unordered(range(200), chunksize=1, progress=False)) == [x * x for x in range(200)]


SEEN: list[int] = []
SEEN_LOCK = threading.Lock()


def record(x: int) -> int:
    with SEEN_LOCK:  # module-level: the in-process replicas share this module with the test
        SEEN.append(x)
    return x


def test_every_input_is_sent_once_when_nothing_fails(inprocess: InProcessCluster) -> None:
    SEEN.clear()
    remote = rm.function(record).to(inprocess)
    with rm.mapper(remote, num_replicas=3) as mapper:
        assert mapper.map(range(1000), progress=False) == list(range(1000))
    assert sorted(SEEN) == list(range(1000))


def test_a_function_that_cannot_travel_is_a_clear_error(inprocess: InProcessCluster) -> None:
    lock = threading.Lock()
    with pytest.raises(rm.SerializationError, match="could not be pickled"):
        rm.function(lambda x: lock).to(inprocess)


def test_a_dead_replica_loses_no_input(inprocess: InProcessCluster) -> None:
    def slow(x: int) -> int:
        time.sleep(0.002)
        return x

    remote = rm.function(slow).to(inprocess)
    with rm.mapper(remote, num_replicas=3, replace_dead=False) as mapper:
        victim = mapper.replicas[2].servlet
        assert isinstance(victim.process, InProcessServletProcess)
        threading.Timer(0.05, victim.kill).start()
        assert mapper.map(range(300), chunksize=1, progress=False) == list(range(300))
        assert mapper.num_replicas == 2
        assert victim.name not in {r.name for r in mapper.replicas}


def test_when_every_replica_dies_the_error_names_each(inprocess: InProcessCluster) -> None:
    remote = rm.function(lambda x: x).to(inprocess)
    with rm.mapper(remote, num_replicas=2, replace_dead=False) as mapper:
        for r in mapper.replicas:
            r.servlet.kill()  # type: ignore[attr-defined]
        with pytest.raises(rm.ReplicaDiedError) as info:
            mapper.map(range(10), progress=False)
        assert set(info.value.replicas) == {"default", "default_replica_1"}
        with pytest.raises(rm.ReplicaDiedError):
            mapper.call(1)  # a broken pool fails new work at once, it does not hang


def test_a_dead_replica_is_replaced(inprocess: InProcessCluster) -> None:
    remote = rm.function(lambda x: time.sleep(0.002) or x + 1).to(inprocess)
    with rm.mapper(remote, num_replicas=2) as mapper:
        mapper.replicas[1].servlet.kill()  # type: ignore[attr-defined]
        assert mapper.map(range(100), chunksize=1, progress=False) == list(range(1, 101))
        deadline = time.monotonic() + 5
        while mapper.num_replicas < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {r.name for r in mapper.replicas} == {"default", "default_replica_2"}


# ---------------------------------------------------------------- the dispatch thread, on real servlets


def _runmap_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("runmap-"))


def napper(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_one_thread_dispatches_for_every_slot(cluster: rm.LocalCluster) -> None:
    # 3 replicas x 8 calls in flight: 24 slots, and still one dispatch thread and no slot threads.
    with rm.mapper(rm.function(jittery).to(cluster), num_replicas=3, concurrency=8) as mapper:
        seen: list[list[str]] = []
        out = []
        for i, y in enumerate(mapper.imap(range(300), chunksize=1, progress=False)):
            out.append(y)
            if i == 150:
                seen.append(_runmap_threads())
        assert out == [x * x for x in range(300)]
        (during,) = seen
        assert during.count("runmap-dispatch") == 1, during
        assert not [name for name in during if name.startswith("runmap-slot")], during


def test_the_calls_in_flight_on_one_connection_run_at_once(cluster: rm.LocalCluster) -> None:
    with rm.mapper(rm.function(napper).to(cluster), num_replicas=1, concurrency=4) as mapper:
        mapper.map([0.0], progress=False)  # started
        started = time.perf_counter()
        assert mapper.map([0.6] * 4, chunksize=1, progress=False) == [0.6] * 4
        assert time.perf_counter() - started < 4 * 0.6 * 0.75  # not one after another



def test_a_dispatch_thread_that_fails_fails_the_map_instead_of_hanging(
    cluster: rm.LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runmap.mapper.dispatch import Dispatcher

    with rm.mapper(rm.function(jittery).to(cluster), num_replicas=1) as mapper:
        assert mapper.map([2], progress=False) == [4]

        def broken(self: Dispatcher) -> bool:
            raise RuntimeError("a bug in the dispatch loop")

        monkeypatch.setattr(Dispatcher, "_feed", broken)
        with pytest.raises(rm.ReplicaDiedError, match="dispatch thread failed"):
            mapper.map(range(10), progress=False)


# ------------------------------------------------ short calls queued at the servlet


def exit_at(x: int, poison: int) -> int:
    if x == poison:
        os._exit(3)
    return x


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_map_of_short_calls_queues_calls_at_the_servlet_and_one_of_long_calls_does_not(
    cluster: rm.LocalCluster,
) -> None:
    with rm.mapper(rm.function(napper).to(cluster), num_replicas=2) as mapper:
        (lane, *_) = mapper._pool._dispatcher._lanes  # type: ignore[union-attr]
        most = 0
        for _ in mapper.imap([0.0] * 2000, chunksize=1, progress=False):
            most = max(most, len(lane.inflight))
        assert most > 1  # concurrency 1, and more sent
        most = 0
        for _ in mapper.imap([0.2] * 6, chunksize=1, progress=False):  # a new map: it learns anew
            most = max(most, len(lane.inflight))
        assert most == 1


def test_calls_queued_behind_an_input_that_kills_its_replica_run_again_uncharged(cluster: rm.LocalCluster) -> None:
    # With no retries, an input lost with its replica fails: only the one that killed it may.
    with rm.mapper(rm.function(exit_at).to(cluster), num_replicas=2, retries=0) as mapper:
        results = mapper.map(
            range(600), kwargs={"poison": 400}, chunksize=1, return_exceptions=True, progress=False
        )
    assert isinstance(results[400], rm.ReplicaDiedError), results[400]
    assert results[:400] + results[401:] == [x for x in range(600) if x != 400]


def test_a_queued_calls_timeout_counts_from_its_start(cluster: rm.LocalCluster) -> None:
    # Four 0.4 s calls queued behind short ones on one replica: the last ends 1.6 s after it was sent.
    with rm.mapper(rm.function(napper).to(cluster), num_replicas=1, retries=0) as mapper:
        (replica,) = mapper.replicas
        out = mapper.map([0.0] * 300 + [0.4] * 4, chunksize=1, timeout=1.0, progress=False)
        assert out == [0.0] * 300 + [0.4] * 4
        assert [r.name for r in mapper.replicas] == [replica.name]  # none was killed for a timeout


def test_long_calls_after_short_ones_are_spread_over_the_replicas(cluster: rm.LocalCluster) -> None:
    # The short calls let each lane queue calls, so the long ones that follow may pile up on one replica:
    # the other takes them back when it runs dry (a withdrawal, dispatch.py).
    with rm.mapper(rm.function(pid_after).to(cluster), num_replicas=2) as mapper:
        pids = mapper.map([0.0] * 500 + [0.3] * 8, chunksize=1, progress=False)
    long = pids[500:]
    assert len(set(pids)) == 2
    assert all(long.count(pid) >= 3 for pid in set(pids)), long  # 4 each, give or take one


def _fake_replica(name: str) -> SimpleNamespace:
    """What a lane reads of its replica: its name, whether it retired, its servlet's token, its module."""
    servlet = SimpleNamespace(endpoint=SimpleNamespace(token="t"))
    return SimpleNamespace(name=name, retired=False, remote=SimpleNamespace(servlet=servlet, module_name="m"))


def test_a_call_the_servlet_hands_back_after_the_client_counted_it_running_is_taken_back() -> None:
    # The client sends B behind A and asks B back; A's answer comes first, so the client counts B
    # as running; but the servlet parses a whole read before it starts any call in it, so it may
    # hand B back all the same. The lane must take it (it once raised, and the dispatch thread died).
    from runmap.mapper.dispatch import Lane
    from runmap.mapper.tasks import Sink, Task
    from runmap.transport.framing import WITHDRAWN

    dispatcher = SimpleNamespace(concurrency=1, watch_deadline=lambda *args: None)
    lane = Lane(dispatcher, _fake_replica("a"), None, None)  # type: ignore[arg-type]
    sink = Sink()
    a, b, c = (Task(i, 0, [i], None, sink, payload=b"x") for i in range(3))
    for task in (a, b, c):
        lane.send(task)
    lane.withdraw(1)  # the newest queued: c
    lane.withdraw(1)  # then b
    assert lane.answered(1) is not None  # a's answer: b counts as running now
    assert lane.taken_back(2, WITHDRAWN) is b
    assert lane.running == 1 and list(lane.waiting) == []  # c may run now
    assert lane.taken_back(3, WITHDRAWN) is c
    assert lane.running == 0 and not lane.inflight and lane.withdrawing == 0


def test_calls_are_never_sent_to_a_lane_whose_first_flush_found_its_servlet_gone() -> None:
    # Lane A's servlet is gone before the map's first calls: the flush right after A's running call
    # fails and hands that call to the failover. The calls queued a lane in turn after that must not
    # go to A (they once did, and a map waited forever for calls no lane or queue held).
    import socket

    from runmap.mapper.dispatch import Dispatcher
    from runmap.mapper.tasks import Sink, Task, TaskQueue

    lost: list[int] = []

    def lost_calls(replica: object, ran: list[Task], exc: Exception, queued: list[Task]) -> None:
        lost.extend(t.start for t in ran + queued)

    pool = SimpleNamespace(tasks=TaskQueue(), lost_calls=lost_calls, dispatch_failed=lambda exc: None)
    sink = Sink()
    sink.seconds = 1e-5  # a map of short calls: calls are queued at the servlets beyond the running one
    tasks = [Task(i, 0, [i], None, sink, payload=b"x") for i in range(6)]
    for task in tasks:
        pool.tasks.put(task)
    gone, gone_peer = socket.socketpair()
    alive, alive_peer = socket.socketpair()
    gone_peer.close()
    dispatcher = Dispatcher(pool, concurrency=1)  # type: ignore[arg-type]
    try:
        dispatcher.add(_fake_replica("a"), gone, None)
        lane_b = dispatcher.add(_fake_replica("b"), alive, None)
        deadline = time.monotonic() + 5
        while True:
            in_b = sorted(call.task.start for call in list(lane_b.inflight.values()))
            queued = sorted(t.start for t in list(pool.tasks._tasks))
            if lost and sorted(lost + in_b + queued) == list(range(6)):
                break
            assert time.monotonic() < deadline, f"lost {lost}, on b {in_b}, queued {queued}: the rest went nowhere"
            time.sleep(0.01)
        assert lost == [0]  # A's one running call, and nothing after it
    finally:
        dispatcher.close(5)
        alive_peer.close()


# ------------------------------------------------ who is charged with a death


def dies_or_waits(x: str, seconds: float) -> str:
    """"die" ends its replica after 0.1 s; any other input answers after ``seconds``."""
    if x == "die":
        time.sleep(0.1)
        os._exit(5)
    time.sleep(seconds)
    return x


def test_answers_written_before_a_replica_died_count_however_late_they_are_read(
    cluster: rm.LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The replica's exit is heard of before the dispatch thread reads the answer "ok" wrote
    # beside "die": "ok" ran and answered, so with retries=0 it must not fail with the death.
    from runmap.mapper.dispatch import Dispatcher

    with rm.mapper(rm.function(dies_or_waits).to(cluster), num_replicas=1, concurrency=2, retries=0) as mapper:
        (replica,) = mapper._pool.replicas
        read = Dispatcher._read
        held = threading.Event()

        def read_once_retired(self: Dispatcher, lane: object) -> None:
            if not replica.retired:
                held.set()
                time.sleep(0.001)  # the socket stays readable: the thread comes back at once
                return
            read(self, lane)  # type: ignore[arg-type]

        monkeypatch.setattr(Dispatcher, "_read", read_once_retired)
        results = mapper.map(
            ["ok", "die"], kwargs={"seconds": 0.0}, chunksize=1, return_exceptions=True, progress=False
        )
    assert held.is_set()  # an answer did wait while the replica was retired
    assert results[0] == "ok", results[0]
    assert isinstance(results[1], rm.ReplicaDiedError), results[1]
    assert "exit code 5" in str(results[1])


def test_inputs_that_ran_beside_a_killer_survive_it(cluster: rm.LocalCluster) -> None:
    # "die" kills the replica that runs it while 3 others run beside it; they go back to the queue
    # with it. Each of them runs alone from then on, so "die" cannot kill a replica under them again.
    inputs = ["die"] + [f"ok{i}" for i in range(7)]
    with rm.mapper(rm.function(dies_or_waits).to(cluster), num_replicas=2, concurrency=4, retries=1) as mapper:
        results = mapper.map(inputs, kwargs={"seconds": 0.5}, chunksize=1, return_exceptions=True, progress=False)
        assert isinstance(results[0], rm.ReplicaDiedError), results[0]
        assert results[0].inputs == [0]
        assert results[1:] == inputs[1:]
        assert len([r for r in mapper._pool.replicas if r.retired]) <= 3  # "die" killed no more than it had tries
        again = [f"x{i}" for i in range(8)]  # and the Mapper goes on
        assert mapper.map(again, kwargs={"seconds": 0.0}, progress=False) == again
