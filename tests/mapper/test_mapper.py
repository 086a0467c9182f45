"""The Mapper end to end, on real servlet processes of a local cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import Future

import pytest
from processes import assert_all_end

import runmap as rm
from runmap.mapper.batching import MAX_CHUNK
from runmap.mapper.dispatch import PIPELINE_DEPTH
from runmap.mapper.run import READ_AHEAD


def power(n: int) -> int:
    return n**n


def pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def sleep_for(seconds: float) -> tuple[int, float]:
    time.sleep(seconds)
    return os.getpid(), seconds


def add(a: int, b: int, c: int = 0) -> int:
    return a + b + c


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"no key {x}")
    return x


class Model:
    def __init__(self, scale: int) -> None:
        self.scale = scale
        self._lock = threading.Lock()
        self._in_flight = 0

    def predict(self, x: int) -> tuple[int, int]:
        return os.getpid(), x * self.scale

    def busy(self, x: int) -> tuple[int, int]:
        """Returns (pid, calls in flight in this replica while this one ran)."""
        with self._lock:
            self._in_flight += 1
            seen = self._in_flight
        time.sleep(0.05)
        with self._lock:
            seen = max(seen, self._in_flight)
            self._in_flight -= 1
        return os.getpid(), seen


def test_lambda_over_three_replicas() -> None:
    with rm.mapper(lambda n: n**n, num_replicas=3) as mapper:
        assert mapper.map([1, 2, 3, 4]) == [1, 4, 27, 256]
        assert mapper.num_replicas == 3


def test_module_method_in_order_from_three_processes(cluster: rm.LocalCluster) -> None:
    model = rm.module(Model).to(cluster, env=rm.env(name="model"))(scale=3)
    with rm.mapper(model.predict, num_replicas=3, concurrency=2) as mapper:
        results = mapper.map(range(200), progress=False)
        names = {r.name for r in mapper.replicas}
    assert [value for _, value in results] == [3 * x for x in range(200)]
    pids = {pid for pid, _ in results}
    assert len(pids) == 3
    assert os.getpid() not in pids
    assert names == {"model", "model_replica_1", "model_replica_2"}


def test_replica_names_are_never_reused(cluster: rm.LocalCluster) -> None:
    fn = rm.function(power).to(cluster, env=rm.env(name="p"))
    with rm.mapper(fn, num_replicas=2) as first:
        first_names = {r.name for r in first.replicas}
    with rm.mapper(fn, num_replicas=2) as second:
        second_names = {r.name for r in second.replicas}
    assert first_names == {"p", "p_replica_1"}
    assert second_names == {"p", "p_replica_2"}


def test_slow_input_does_not_hold_back_others() -> None:
    inputs = [1.0] + [0.1] * 10
    with rm.mapper(sleep_for, num_replicas=2) as mapper:
        mapper.map([0.0, 0.0], progress=False)  # both replicas warm
        start = time.perf_counter()
        results = mapper.map(inputs, progress=False)
        elapsed = time.perf_counter() - start
    assert [s for _, s in results] == inputs
    slow_pid = results[0][0]
    assert all(pid != slow_pid for pid, _ in results[1:]), "the other replica should take all ten"
    assert elapsed < 1.4, f"took {elapsed:.2f} s; round-robin would take 1.5 s"


def test_two_calls_run_in_parallel() -> None:
    with rm.mapper(sleep_for, num_replicas=2) as mapper:
        mapper.map([0.0, 0.0], progress=False)
        start = time.perf_counter()
        results = mapper.map([1.0, 1.0], progress=False)
        elapsed = time.perf_counter() - start
    assert len({pid for pid, _ in results}) == 2
    assert elapsed < 1.6


def test_a_replica_never_has_more_than_concurrency_calls(cluster: rm.LocalCluster) -> None:
    model = rm.module(Model).to(cluster, env=rm.env(name="busy"))(scale=1)
    with rm.mapper(model.busy, num_replicas=2, concurrency=2) as mapper:
        results = mapper.map(range(40), chunksize=1, progress=False)
    by_pid: dict[int, int] = {}
    for pid, seen in results:
        by_pid[pid] = max(by_pid.get(pid, 0), seen)
    assert len(by_pid) == 2
    assert max(by_pid.values()) == 2, by_pid  # concurrency is used...
    assert all(v <= 2 for v in by_pid.values())  # ...and never exceeded


def test_starmap_zip_imap_unordered_call_submit() -> None:
    with rm.mapper(add, num_replicas=2) as mapper:
        assert mapper.starmap([(1, 2), (3, 4)], progress=False) == [3, 7]
        assert mapper.map([1, 2, 3], [10, 20], progress=False) == [11, 22]  # zips, shortest wins
        assert mapper.map([1, 2], [1, 1], kwargs={"c": 100}, progress=False) == [102, 103]
        squares = mapper.imap((i for i in range(50)), (i for i in range(50)), progress=False)
        assert list(squares) == [2 * i for i in range(50)]
        unordered = list(mapper.imap_unordered(range(30), range(30), progress=False))
        assert sorted(unordered) == [2 * i for i in range(30)]
        assert mapper.call(2, 3, c=4) == 9
        future = mapper.submit(5, 6)
        assert isinstance(future, Future)
        assert future.result(timeout=30) == 11


def test_imap_is_lazy_over_an_endless_generator() -> None:
    consumed = 0

    def naturals():  # type: ignore[no-untyped-def]
        nonlocal consumed
        n = 0
        while True:
            consumed += 1
            yield n
            n += 1

    with rm.mapper(power, num_replicas=2) as mapper:
        stream = mapper.imap(naturals(), chunksize=1, progress=False)
        first = [next(stream) for _ in range(5)]
        stream.close()  # type: ignore[attr-defined]
        # What was yielded, the read-ahead of two slots, and the short calls two replicas may queue.
        assert consumed <= 5 + READ_AHEAD * 2 + (PIPELINE_DEPTH - 1) * 2
        consumed = 0
        stream = mapper.imap(naturals(), progress=False)  # adaptive chunks grow, but stay bounded
        assert [next(stream) for _ in range(5)] == first
        stream.close()  # type: ignore[attr-defined]
    assert first == [power(n) for n in range(5)]
    assert consumed <= (READ_AHEAD * 2 + (PIPELINE_DEPTH - 1) * 2) * MAX_CHUNK


def test_remote_exception_keeps_its_type_and_traceback() -> None:
    with rm.mapper(fail_on_three, num_replicas=2) as mapper:
        with pytest.raises(KeyError) as info:
            mapper.map(range(6), progress=False)
        assert "no key 3" in str(info.value)
        cause = info.value.__cause__
        assert isinstance(cause, rm.exceptions.RemoteTraceback)
        assert "fail_on_three" in str(cause) and "raise KeyError" in str(cause)

        results = mapper.map(range(6), return_exceptions=True, progress=False)
        assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
        assert isinstance(results[3], KeyError)
        with pytest.raises(KeyError):
            mapper.call(3)


def test_one_mapper_over_target_supplied_and_created_replicas(cluster: rm.LocalCluster) -> None:
    with rm.LocalCluster(name="other") as other:
        target = rm.function(pid_and_square).to(cluster, env=rm.env(name="home"))
        foreign = rm.function(pid_and_square).to(other, env=rm.env(name="away"))
        with rm.mapper(target, replicas=[foreign], num_replicas=3) as mapper:
            names = sorted(r.name for r in mapper.replicas)
            results = mapper.map(range(300), chunksize=1, progress=False)
        assert names == ["away", "home", "home_replica_1"]
        assert [sq for _, sq in results] == [x * x for x in range(300)]
        assert len({pid for pid, _ in results}) == 3


def test_runhouse_spelling_of_num_replicas() -> None:
    with rm.mapper(power, replicas=2) as mapper:
        assert mapper.num_replicas == 2


def test_options_are_checked() -> None:
    with rm.mapper(power, num_replicas=1) as mapper:
        with pytest.raises(rm.ConfigError, match="kwargs="):
            mapper.map([1], bogus=True)
        with pytest.raises(rm.ConfigError, match="chunksize"):
            mapper.map([1], chunksize=0)
    with pytest.raises(rm.ConfigError):
        rm.mapper(power, num_replicas=0)
    with pytest.raises(rm.RunmapError, match="closed"):
        mapper.map([1])


def test_close_answers_every_pending_future() -> None:
    from concurrent.futures import wait

    mapper = rm.mapper(sleep_for, num_replicas=1)
    futures = [mapper.submit(0.3) for _ in range(5)]
    time.sleep(0.1)
    mapper.close()
    done, not_done = wait(futures, timeout=10)
    assert not not_done
    assert all(isinstance(f.exception(), rm.ReplicaDiedError) for f in futures[1:])


class SourceBroke(Exception):
    pass


def three_then_fail():  # type: ignore[no-untyped-def]
    yield from range(3)
    raise SourceBroke("the source broke after 3 inputs")


@pytest.mark.parametrize("chunksize", ["auto", 2])
def test_a_generator_that_raises_gives_the_results_before_it_then_its_own_error(chunksize: int | str) -> None:
    with rm.mapper(power, num_replicas=2) as mapper:
        received = []
        with pytest.raises(SourceBroke, match="after 3 inputs"):
            for r in mapper.imap(three_then_fail(), chunksize=chunksize, progress=False):
                received.append(r)
        assert received == [power(n) for n in range(3)]
        unordered = []
        with pytest.raises(SourceBroke):
            for r in mapper.imap_unordered(three_then_fail(), chunksize=chunksize, progress=False):
                unordered.append(r)
        assert sorted(unordered) == [power(n) for n in range(3)]
        with pytest.raises(SourceBroke):
            mapper.map(three_then_fail(), progress=False)
        assert mapper.map([2], progress=False) == [4]  # nothing stale left behind


def test_a_user_exception_says_which_input_and_replica_raised_it(cluster: rm.LocalCluster) -> None:
    target = rm.function(fail_on_three).to(cluster, env=rm.env(name="three"))
    with rm.mapper(target, num_replicas=2) as mapper:
        names = {r.name for r in mapper.replicas}
        with pytest.raises(KeyError) as info:
            mapper.map(range(6), progress=False)
        exc = info.value
        assert type(exc) is KeyError  # its own type, nothing wrapped around it
        assert exc.runmap_index == 3 and exc.runmap_replica in names  # type: ignore[attr-defined]
        if sys.version_info >= (3, 11):
            assert exc.__notes__ == [f"runmap: raised by input 3 on replica {exc.runmap_replica}"]  # type: ignore[attr-defined]
            assert f"input 3 on replica {exc.runmap_replica}" in "".join(traceback.format_exception(exc))  # type: ignore[attr-defined]

        returned = mapper.map(range(6), return_exceptions=True, progress=False)[3]
        assert isinstance(returned, KeyError) and returned.runmap_index == 3  # type: ignore[attr-defined]

        with pytest.raises(KeyError) as one:
            mapper.call(3)
        assert one.value.runmap_index is None and one.value.runmap_replica in names  # type: ignore[attr-defined]
    with pytest.raises(KeyError) as direct:
        target(3)
    assert direct.value.runmap_replica == "three"  # type: ignore[attr-defined]
    if sys.version_info >= (3, 11):
        assert direct.value.__notes__ == ["runmap: raised on replica three"]


def test_a_timeout_must_be_a_positive_number_or_none() -> None:
    bad = [0, -1, "5", True, float("nan"), float("inf")]
    for value in bad:
        with pytest.raises(rm.ConfigError, match="timeout"):
            rm.mapper(power, num_replicas=1, timeout=value)
    with rm.mapper(power, num_replicas=1, timeout=None) as mapper:
        for value in bad:
            with pytest.raises(rm.ConfigError, match="timeout"):
                mapper.map([1], timeout=value, progress=False)
        assert mapper.map([2], timeout=30, progress=False) == [4]
        assert mapper.map([2], timeout=0.5, progress=False) == [4]


def test_remote_methods_are_accepted_as_replicas(cluster: rm.LocalCluster) -> None:
    a = rm.module(Model).to(cluster, env=rm.env(name="ma"))(scale=2)
    b = rm.module(Model).to(cluster, env=rm.env(name="mb"))(scale=2)
    c = rm.module(Model).to(cluster, env=rm.env(name="mc"))(scale=2)
    with rm.mapper(a.predict, replicas=[b.predict]) as mapper:
        assert sorted(r.name for r in mapper.replicas) == ["ma", "mb"]
        mapper.add_replicas([c.predict])
        results = mapper.map(range(60), chunksize=1, progress=False)
        assert sorted(r.name for r in mapper.replicas) == ["ma", "mb", "mc"]
        with pytest.raises(rm.ConfigError, match="busy"):
            mapper.add_replicas([c.busy])
    assert [v for _, v in results] == [2 * x for x in range(60)]
    with pytest.raises(rm.ConfigError, match="'busy'.*'predict'"):
        rm.mapper(a.predict, replicas=[b.busy])
    with pytest.raises(rm.ConfigError, match="'busy'.*'predict'"):
        rm.mapper(a, method="predict", replicas=[b.busy])
    with rm.mapper(a, method="predict", replicas=[b.predict]) as mapper:
        assert mapper.num_replicas == 2


def pid_after(seconds: float) -> int:
    if seconds:
        time.sleep(seconds)
    return os.getpid()


def test_slow_inputs_after_a_map_of_quick_ones_still_spread_over_the_replicas() -> None:
    # The second map starts at the first one's pace (chunks of hundreds), yet 8 slow inputs
    # travel in chunks of a fourth of them at most, so both replicas run them.
    with rm.mapper(pid_after, num_replicas=2) as mapper:
        assert len(mapper.map([0.0] * 20_000, progress=False)) == 20_000
        assert mapper.pace is not None and mapper.pace[0] < 1e-4  # trivial inputs
        start = time.monotonic()
        pids = mapper.map([0.2] * 8, progress=False)
        took = time.monotonic() - start
    assert sorted(pids.count(pid) for pid in set(pids)) == [4, 4], pids
    assert took < 8 * 0.2 * 0.9, took  # in parallel (one after another: 1.6 s)


LEFT_OPEN = """
import json, os, sys
import runmap as rm

def ident(x):
    return os.getpid()

m = rm.mapper(ident, num_replicas=NUM_REPLICAS)
print(json.dumps(sorted(set(m.map(range(20), progress=False, chunksize=1)))), flush=True)
"""


@pytest.mark.parametrize("template", ["1", "0"])
@pytest.mark.parametrize("num_replicas", [1, 3])
def test_a_mapper_left_open_ends_with_the_interpreter_quietly(template: str, num_replicas: int) -> None:
    # At exit the Mapper closes its replicas itself: no traceback, no wait, nothing left running.
    env = {**os.environ, "RUNMAP_TEMPLATE": template}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", LEFT_OPEN.replace("NUM_REPLICAS", str(num_replicas))],
        capture_output=True, text=True, env=env, timeout=60,
    )
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    pids = json.loads(out.stdout)
    assert len(pids) == num_replicas
    assert_all_end(pids, within=5, what="a replica outlived the script that left its Mapper open")
    assert took < 4.0, f"the script took {took:.1f} s to exit"
