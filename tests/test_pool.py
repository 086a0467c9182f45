"""rm.Pool against multiprocessing.Pool: the same scenarios, the same results and exception types."""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import runmap as rm


class Overdrawn(Exception):
    """A user's own exception type: both pools must raise it as itself."""


def square(x: int) -> int:
    return x * x


def withdraw(balance: int, amount: int) -> int:
    if amount > balance:
        raise Overdrawn(f"cannot take {amount} from {balance}")
    return balance - amount


def checked(x: int) -> int:
    if x == 3:
        raise Overdrawn("three")
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def scaled(x: int, *, factor: int = 1) -> int:
    return x * factor


def pid(_: Any = None) -> int:
    time.sleep(0.01)
    return os.getpid()


_greeting = "unset"


def set_greeting(word: str) -> None:
    global _greeting
    _greeting = word


def greeting(_: Any = None) -> str:
    return _greeting


def numbers(n: int) -> Iterator[int]:
    yield from range(n)


def numbers_then_fail(n: int) -> Iterator[int]:
    yield from range(n)
    raise Overdrawn("the inputs ran out of money")


KINDS = ["multiprocessing", "runmap"]


def make_pool(kind: str, *args: Any, **kwargs: Any) -> Any:
    if kind == "multiprocessing":
        return multiprocessing.get_context("fork").Pool(*args, **kwargs)
    return rm.Pool(*args, **kwargs)


@pytest.fixture(scope="module", params=KINDS)
def pool(request: pytest.FixtureRequest) -> Iterator[Any]:
    p = make_pool(request.param, 2)
    yield p
    p.terminate()
    p.join()


# ------------------------------------------------------------------ results


def test_map_starmap_apply_give_the_same_results(pool: Any) -> None:
    assert pool.map(square, range(10)) == [x * x for x in range(10)]
    assert pool.map(square, range(10), chunksize=3) == [x * x for x in range(10)]
    assert pool.map(square, []) == []
    assert pool.map(square, (x for x in range(5))) == [0, 1, 4, 9, 16]
    assert pool.starmap(withdraw, [(10, 1), (20, 2)]) == [9, 18]
    assert pool.apply(withdraw, (10, 3)) == 7
    assert pool.apply(scaled, (4,), {"factor": 5}) == 20
    assert pool.map_async(square, [1, 2]).get(timeout=30) == [1, 4]
    assert pool.starmap_async(withdraw, [(3, 1)]).get(timeout=30) == [2]


def test_map_returns_a_list_in_input_order(pool: Any) -> None:
    result = pool.map(nap, [0.2, 0.0, 0.1, 0.0], chunksize=1)
    assert type(result) is list and result == [0.2, 0.0, 0.1, 0.0]


def test_imap_over_a_generator_in_order(pool: Any) -> None:
    assert list(pool.imap(square, numbers(7))) == [x * x for x in range(7)]
    assert list(pool.imap(square, numbers(7), chunksize=3)) == [x * x for x in range(7)]
    assert sorted(pool.imap_unordered(square, numbers(7))) == [x * x for x in range(7)]
    assert sorted(pool.imap_unordered(square, numbers(7), chunksize=2)) == [x * x for x in range(7)]


def test_imap_yields_in_order_and_unordered_as_completed(pool: Any) -> None:
    assert list(pool.imap(nap, [0.4, 0.0])) == [0.4, 0.0]
    assert list(pool.imap_unordered(nap, [0.4, 0.0])) == [0.0, 0.4]


def test_imap_next_with_timeout(pool: Any) -> None:
    it = pool.imap(nap, [0.5])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    assert it.next(timeout=30) == 0.5
    with pytest.raises(StopIteration):
        next(it)


def test_imap_raises_what_the_inputs_raise_after_their_results(pool: Any) -> None:
    it = pool.imap(square, numbers_then_fail(3))
    assert [next(it) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(Overdrawn, match="ran out of money"):
        next(it)


def test_imap_chunksize_below_1_is_a_value_error(pool: Any) -> None:
    with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
        pool.imap(square, [1], chunksize=0)


# --------------------------------------------------------------- exceptions


def test_exceptions_come_back_as_their_type_with_a_remote_traceback(pool: Any) -> None:
    for call in (
        lambda: pool.apply(withdraw, (1, 5)),
        lambda: pool.map(checked, range(6)),
        lambda: pool.starmap(withdraw, [(5, 1), (1, 5)]),
        lambda: list(pool.imap(checked, range(6))),
        lambda: list(pool.imap_unordered(checked, range(6))),
        lambda: pool.map_async(checked, range(6)).get(timeout=30),
    ):
        with pytest.raises(Overdrawn) as info:
            call()
        cause = info.value.__cause__
        assert type(cause) is multiprocessing.pool.RemoteTraceback  # type: ignore[attr-defined]
        assert "Traceback" in str(cause) and str(cause).startswith('\n"""\n')


def test_imap_yields_the_results_before_a_failure(pool: Any) -> None:
    it = pool.imap(checked, range(6))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(Overdrawn):
        next(it)


# ------------------------------------------------------------ async results


def test_apply_async_callbacks_and_error_callbacks(pool: Any) -> None:
    got: list[Any] = []
    errors: list[BaseException] = []
    ok = pool.apply_async(withdraw, (10, 4), callback=got.append, error_callback=errors.append)
    bad = pool.apply_async(withdraw, (1, 4), callback=got.append, error_callback=errors.append)
    mapped = pool.map_async(square, [1, 2, 3], callback=got.append, error_callback=errors.append)
    assert ok.get(timeout=30) == 6
    with pytest.raises(Overdrawn):
        bad.get(timeout=30)
    assert mapped.get(timeout=30) == [1, 4, 9]
    assert sorted(map(str, got)) == ["6", "[1, 4, 9]"]
    assert [type(e) for e in errors] == [Overdrawn]
    assert ok.ready() and ok.successful()
    assert bad.ready() and not bad.successful()


def test_map_async_error_callback(pool: Any) -> None:
    errors: list[BaseException] = []
    result = pool.map_async(checked, range(6), error_callback=errors.append)
    result.wait(30)
    assert result.ready() and not result.successful()
    assert [type(e) for e in errors] == [Overdrawn]


def test_async_result_get_timeout_wait_ready_successful(pool: Any) -> None:
    result = pool.apply_async(nap, (0.5,))
    assert not result.ready()
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.05)
    result.wait(0.01)
    assert not result.ready()
    result.wait()
    assert result.ready() and result.successful() and result.get() == 0.5


# -------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("kind", KINDS)
def test_close_join_and_then_pool_not_running(kind: str) -> None:
    pool = make_pool(kind, 1)
    pending = pool.apply_async(nap, (0.3,))
    with pytest.raises(ValueError, match="Pool is still running"):
        pool.join()
    pool.close()
    for call in (
        lambda: pool.map(square, [1]),
        lambda: pool.apply_async(square, (1,)),
        lambda: pool.imap(square, [1]),
        lambda: pool.starmap(withdraw, [(1, 1)]),
    ):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    pool.join()
    assert pending.ready() and pending.get() == 0.3


@pytest.mark.parametrize("kind", KINDS)
def test_context_manager_terminates_on_exit(kind: str) -> None:
    with make_pool(kind, 1) as pool:
        assert pool.map(square, [2, 3]) == [4, 9]
        started = time.monotonic()
        pool.apply_async(nap, (5.0,))
        time.sleep(0.2)
    assert time.monotonic() - started < 4  # exit is terminate: the running call is not waited for
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(square, [1])
    pool.join()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_arguments_raise_as_pool_does(kind: str) -> None:
    with pytest.raises(ValueError, match="Number of processes must be at least 1"):
        make_pool(kind, 0)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        make_pool(kind, 1, maxtasksperchild=0)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        make_pool(kind, 1, initializer=42)


@pytest.mark.parametrize("kind", KINDS)
def test_initializer_runs_in_every_worker(kind: str) -> None:
    with make_pool(kind, 2, initializer=set_greeting, initargs=("hello",)) as pool:
        assert pool.map(greeting, range(8), chunksize=1) == ["hello"] * 8
        assert pool.apply(greeting) == "hello"
    assert greeting() == "unset"  # it ran in the workers, not here


@pytest.mark.parametrize("kind", KINDS)
def test_maxtasksperchild_replaces_workers(kind: str) -> None:
    with make_pool(kind, 1, initializer=set_greeting, initargs=("again",), maxtasksperchild=2) as pool:
        pids = pool.map(pid, range(6), chunksize=1)
        assert len(set(pids)) == 3  # a worker per two tasks
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
        assert pool.map(greeting, range(4), chunksize=1) == ["again"] * 4  # the initializer ran in each new worker
        pool.close()
        pool.join()


# ------------------------------------------------------------ runmap's own


def test_runmap_pool_runs_lambdas_and_closures() -> None:
    offset = 100
    with rm.Pool(2) as pool:
        assert pool.map(lambda x: x + offset, [1, 2]) == [101, 102]
        assert os.getpid() not in set(pool.map(pid, range(4)))


def test_runmap_pool_names_what_cannot_be_pickled() -> None:
    with rm.Pool(1) as pool:
        with pytest.raises(rm.SerializationError, match="could not be pickled"):
            pool.map(square, [1, threading.Lock()])
        result = pool.apply_async(square, (threading.Lock(),))
        with pytest.raises(rm.SerializationError, match="could not be pickled"):
            result.get(timeout=30)
        assert pool.map(square, [3]) == [9]  # the pool still works


def test_runmap_pool_runs_on_a_given_cluster(cluster: rm.LocalCluster) -> None:
    with rm.Pool(2, cluster=cluster) as pool:
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
        assert pool._mapper.num_replicas == 2

