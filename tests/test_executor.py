"""rm.Executor: the concurrent.futures interface, on real local replicas."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import pytest

import runmap as rm
from runmap.exceptions import RemoteTraceback


class Overdrawn(Exception):
    """A user's own exception type: it must come back as itself."""


def withdraw(balance: int, amount: int) -> int:
    if amount > balance:
        raise Overdrawn(f"cannot take {amount} from {balance}")
    return balance - amount


def scale(x: int, *, factor: int = 1) -> int:
    return x * factor


def slow_identity(x: float) -> float:
    time.sleep(x)
    return x


@pytest.fixture(scope="module")
def ex() -> Iterator[rm.Executor]:
    with rm.Executor(num_replicas=2) as executor:
        yield executor


def test_is_a_standard_executor(ex: rm.Executor) -> None:
    assert isinstance(ex, concurrent.futures.Executor)
    assert ex.num_replicas == 2


def test_submit_runs_any_function_with_args_and_kwargs(ex: rm.Executor) -> None:
    assert ex.submit(withdraw, 10, 3).result(timeout=30) == 7
    assert ex.submit(scale, 4, factor=5).result(timeout=30) == 20
    assert ex.submit(pow, 2, 10).result(timeout=30) == 1024
    offset = 100
    assert ex.submit(lambda x: x + offset, 1).result(timeout=30) == 101  # closures travel by value


def test_submit_runs_in_replica_processes(ex: rm.Executor) -> None:
    import os

    pids = {f.result(timeout=30) for f in [ex.submit(os.getpid) for _ in range(4)]}
    assert os.getpid() not in pids


def test_exception_arrives_as_the_users_type(ex: rm.Executor) -> None:
    future = ex.submit(withdraw, 1, 5)
    with pytest.raises(Overdrawn, match="cannot take 5 from 1") as info:
        future.result(timeout=30)
    assert isinstance(future.exception(), Overdrawn)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "withdraw" in str(info.value.__cause__)


def test_map_keeps_input_order_and_zips_iterables(ex: rm.Executor) -> None:
    assert list(ex.map(slow_identity, [0.2, 0.0, 0.1, 0.0])) == [0.2, 0.0, 0.1, 0.0]
    assert list(ex.map(withdraw, [10, 20, 30], [1, 2])) == [9, 18]


def test_map_with_chunksize(ex: rm.Executor) -> None:
    assert list(ex.map(withdraw, range(10, 20), [1] * 10, chunksize=3)) == list(range(9, 19))


def test_map_raises_when_the_failed_result_is_reached(ex: rm.Executor) -> None:
    results = ex.map(withdraw, [5, 1, 5], [1, 2, 3])
    assert next(results) == 4
    with pytest.raises(Overdrawn, match="cannot take 2 from 1"):
        next(results)


def test_map_timeout(ex: rm.Executor) -> None:
    started = time.monotonic()
    results = ex.map(slow_identity, [0.0, 1.0], timeout=0.3)
    assert next(results) == 0.0
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)
    assert time.monotonic() - started < 1.0


def test_pending_future_can_be_cancelled(ex: rm.Executor) -> None:
    busy = [ex.submit(slow_identity, 0.5) for _ in range(3)]  # 2 replicas + 1 queued: all handed over
    waiting = ex.submit(slow_identity, 0.0)
    assert waiting.cancel()
    assert waiting.cancelled()
    assert [f.result(timeout=30) for f in busy] == [0.5] * 3
    assert not busy[0].cancel()  # a call that ran cannot be cancelled


def test_unpicklable_argument_fails_its_future_only(ex: rm.Executor) -> None:
    import threading

    bad = ex.submit(withdraw, threading.Lock(), 1)
    with pytest.raises(rm.SerializationError, match="could not be pickled"):
        bad.result(timeout=30)
    assert ex.submit(withdraw, 3, 1).result(timeout=30) == 2


def test_context_manager_waits_and_then_refuses_work() -> None:
    with rm.Executor(num_replicas=1) as executor:
        future = executor.submit(slow_identity, 0.3)
    assert future.done() and future.result() == 0.3
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(slow_identity, 0)
    executor.shutdown()  # a second shutdown is harmless


def test_shutdown_cancel_futures_cancels_only_pending_calls() -> None:
    executor = rm.Executor(num_replicas=1)
    futures = [executor.submit(slow_identity, 0.3) for _ in range(5)]  # 2 handed over, 3 pending
    executor.shutdown(wait=True, cancel_futures=True)
    assert [f.cancelled() for f in futures] == [False, False, True, True, True]
    assert [f.result() for f in futures[:2]] == [0.3, 0.3]


def test_shutdown_without_wait_finishes_accepted_calls() -> None:
    executor = rm.Executor(num_replicas=1)
    futures = [executor.submit(slow_identity, 0.2) for _ in range(3)]
    started = time.monotonic()
    executor.shutdown(wait=False)
    assert time.monotonic() - started < 0.2
    with pytest.raises(RuntimeError):
        executor.submit(slow_identity, 0)
    assert [f.result(timeout=30) for f in futures] == [0.2] * 3
    # the replicas end once those calls are done: the no-leak fixture checks it


def test_terminate_workers_ends_everything_now() -> None:
    executor = rm.Executor(num_replicas=1)
    futures = [executor.submit(slow_identity, 5.0) for _ in range(3)]  # running, handed over, pending
    time.sleep(0.3)
    started = time.monotonic()
    executor.terminate_workers()
    _, not_done = concurrent.futures.wait(futures, timeout=5)
    assert not not_done and time.monotonic() - started < 4
    assert futures[2].cancelled()
    for future in futures[:2]:
        with pytest.raises(rm.ReplicaDiedError):
            future.result()
    with pytest.raises(RuntimeError):
        executor.submit(slow_identity, 0)
    executor.shutdown()


class Payload:
    """An argument a weakref can watch."""

    def __init__(self, n: int) -> None:
        self.n = n


def payload_size(p: Payload) -> Payload:
    return Payload(p.n * 2)


def test_a_finished_future_keeps_nothing_of_its_call(ex: rm.Executor) -> None:
    import gc
    import weakref

    obj = Payload(21)
    watched = weakref.ref(obj)
    f = ex.submit(payload_size, obj)
    result = f.result(timeout=30)
    assert result.n == 42
    result_ref = weakref.ref(result)
    del obj
    gc.collect()
    assert watched() is None, "the executor kept the call's argument"
    del f, result
    deadline = time.monotonic() + 2  # the replica's slot thread lets go of the outcome just after it delivered it
    while result_ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert result_ref() is None, "the executor kept the call's result"


def test_shutdown_without_wait_returns_at_once_while_a_call_runs() -> None:
    executor = rm.Executor(num_replicas=1)
    future = executor.submit(slow_identity, 1.0)
    time.sleep(0.3)  # the call is running
    assert future.running()
    started = time.monotonic()
    executor.shutdown(wait=False)
    took = time.monotonic() - started
    assert took < 0.5, f"shutdown(wait=False) took {took:.2f} s"
    assert future.result(timeout=30) == 1.0
