"""When things go wrong: replicas that die, hang or raise, and inputs that can't travel.

The crash table follows loky's: each row is a way for a replica to fail in the
middle of a map of hundreds of inputs, and what the user must see.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from crashes import CRASHES, EXPECTED, POISON, N, check_crash, crash_at, fates
from processes import assert_all_end

import runmap as rm


@pytest.mark.parametrize("case,options,error,pattern", CRASHES, ids=[c[0] for c in CRASHES])
def test_crash_table(case: str, options: dict, error: type, pattern: str) -> None:
    with rm.mapper(crash_at, num_replicas=3, **options) as mapper:
        check_crash(mapper, case, error, pattern)


@pytest.mark.parametrize("case", ["exit", "segv", "sigkill"])
def test_a_crash_that_happens_once_loses_nothing(case: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = str(tmp_path / "crashed")
    with rm.mapper(crash_at, num_replicas=3) as mapper:
        results = mapper.map(range(N), kwargs={"case": case, "marker": marker}, progress=False)
        assert results == EXPECTED
        assert os.path.exists(marker)
        dead = [n for n, r in fates(mapper).items() if r != "alive"]
        assert len(dead) == 1
        deadline = time.monotonic() + 20
        while mapper.num_replicas < 3 and time.monotonic() < deadline:  # replaced in the background
            time.sleep(0.1)
        assert mapper.num_replicas == 3


def slow_double(x: int) -> tuple[int, int]:
    time.sleep(0.005)
    return os.getpid(), 2 * x


def test_sigkill_from_outside_mid_map() -> None:
    with rm.mapper(slow_double, num_replicas=3) as mapper:
        victim = mapper.replicas[1]
        victim_pid = victim.servlet.pid
        assert victim_pid is not None
        results = []
        for result in mapper.imap(range(400), chunksize=1, progress=False):
            results.append(result)
            if len(results) == 50:  # mid-map: 350 inputs to go, some of them on the victim
                os.kill(victim_pid, signal.SIGKILL)
        assert [v for _, v in results] == [2 * x for x in range(400)]
        assert victim.name not in {r.name for r in mapper.replicas}
        assert "SIGKILL(-9)" in fates(mapper)[victim.name]
        after = mapper.map(range(100), progress=False)
        assert victim_pid not in {pid for pid, _ in after}
        assert [v for _, v in after] == [2 * x for x in range(100)]


def test_no_replica_left_says_what_happened_to_each() -> None:
    with rm.mapper(crash_at, num_replicas=2, replace_dead=False, retries=5) as mapper:
        with pytest.raises(rm.ReplicaDiedError) as info:
            mapper.map(range(N), kwargs={"case": "exit"}, progress=False)
        err = info.value
        assert len(err.replicas) == 2 and all("exit code 1" in r for r in err.replicas.values())
        assert "no replica is left" in str(err)


def sleeper(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_timeout_kills_the_stuck_replica_and_the_mapper_stays_usable() -> None:
    with rm.mapper(sleeper, num_replicas=1, timeout=1) as mapper:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            mapper.map([30], progress=False)
        assert time.monotonic() - start < 5
        assert mapper.map([0.01, 0.02], progress=False) == [0.01, 0.02]
        with pytest.raises(rm.ReplicaTimeoutError):
            mapper.call(30)


def returns_a_lock(x: int) -> object:
    return threading.Lock() if x == 2 else x


def test_unpicklable_argument_and_result_name_the_index_and_side() -> None:
    with rm.mapper(returns_a_lock, num_replicas=2) as mapper:
        with pytest.raises(rm.SerializationError) as arg:
            mapper.map([0, 1, threading.Lock(), 3], progress=False)
        assert arg.value.index == 2 and arg.value.side == "argument"
        assert "input 2" in str(arg.value) and "argument" in str(arg.value)

        with pytest.raises(rm.SerializationError) as res:
            mapper.map(range(5), progress=False)
        assert res.value.index == 2 and res.value.side == "result"
        assert "input 2" in str(res.value) and "result" in str(res.value)
        assert res.value.replica in {r.name for r in mapper.replicas}

        mixed = mapper.map([0, 1, threading.Lock(), 3], return_exceptions=True, progress=False)
        assert mixed[:2] == [0, 1] and mixed[3] == 3 and isinstance(mixed[2], rm.SerializationError)
        mixed = mapper.map(range(5), return_exceptions=True, progress=False)
        assert mixed[:2] == [0, 1] and mixed[3:] == [3, 4] and isinstance(mixed[2], rm.SerializationError)


class Flaky(Exception):
    pass


def flaky(x: int, marker_dir: str) -> int:
    marker = os.path.join(marker_dir, str(x))
    if x % 10 == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        raise Flaky(f"first try of {x}")
    return x


def test_retry_exceptions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with rm.mapper(flaky, num_replicas=2, retry_exceptions=Flaky) as mapper:
        assert mapper.map(range(50), kwargs={"marker_dir": str(tmp_path)}, progress=False) == list(range(50))
    (tmp_path / "again").mkdir()
    with rm.mapper(flaky, num_replicas=2, retry_exceptions=KeyError) as mapper:
        with pytest.raises(Flaky):
            mapper.map(range(50), kwargs={"marker_dir": str(tmp_path / "again")}, progress=False)


def logged(x: int, log: str, fail_at: int | None) -> int:
    with open(log, "a") as f:
        f.write(f"{x}\n")
    if x == fail_at:
        raise ValueError(f"failed at {x}")
    return x * 10


def _read(path: str) -> list[str]:
    with open(path) as f:
        return f.read().split()


def test_checkpoint_resumes_only_what_did_not_complete(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "run.db"
    log = str(tmp_path / "calls.log")
    with rm.mapper(logged, num_replicas=2) as mapper:
        with pytest.raises(ValueError, match="failed at 60"):
            mapper.map(range(100), kwargs={"log": log, "fail_at": 60}, chunksize=1, checkpoint=db, progress=False)
        first = _read(log)
        assert "60" in first
        os.remove(log)
        options = {"chunksize": 1, "checkpoint": db, "progress": False}
        results = mapper.map(range(100), kwargs={"log": log, "fail_at": None}, **options)
        second = [int(x) for x in _read(log)]
    assert results == [x * 10 for x in range(100)]
    assert 60 in second and all(x >= 60 for x in second), sorted(second)
    assert len(second) <= 41
    # A third run takes everything from the file.
    os.remove(log)
    with rm.mapper(logged, num_replicas=1) as mapper:
        again = mapper.map(range(100), kwargs={"log": log, "fail_at": None}, checkpoint=db, progress=False)
    assert again == results and not os.path.exists(log)


def test_checkpoint_survives_a_killed_client(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys
    import textwrap

    db, log = tmp_path / "run.db", tmp_path / "calls.log"
    script = textwrap.dedent(
        f"""
        import json
        import time
        import runmap as rm

        def slow(x):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{x}}\\n")
            time.sleep(0.05)
            return x * 10

        with rm.mapper(slow, num_replicas=2) as mapper:
            print(json.dumps([r.servlet.pid for r in mapper.replicas]), flush=True)
            for i, _ in enumerate(mapper.imap(range(100), chunksize=1, checkpoint={str(db)!r}, progress=False)):
                if i == 30:
                    print("halfway", flush=True)
        """
    )
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    servlets = json.loads(client.stdout.readline())
    assert client.stdout.readline().strip() == "halfway"
    client.kill()
    client.wait(30)
    client.stdout.close()
    # The orphaned servlets notice and exit; until then, a call of theirs may still write to the log.
    assert_all_end(servlets, within=10, what="a servlet outlived its killed client")
    log.unlink()
    with rm.mapper(logged, num_replicas=2) as mapper:
        options = {"chunksize": 1, "checkpoint": db, "progress": False}
        results = mapper.map(range(100), kwargs={"log": str(log), "fail_at": None}, **options)
    assert results == [x * 10 for x in range(100)]
    rerun = [int(x) for x in _read(str(log))]
    assert len(rerun) < 75, f"{len(rerun)} inputs ran again; at least 30 had completed"
    assert all(x >= 25 for x in rerun)


def test_a_dead_replica_leaves_its_clusters_books(cluster: rm.LocalCluster) -> None:
    target = rm.function(slow_double).to(cluster, env=rm.env(name="books"))
    with rm.mapper(target, num_replicas=3, replace_dead=False) as mapper:
        for victim in (mapper.replicas[0].servlet, mapper.replicas[1].servlet):  # the target's own, and a copy
            os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        assert len(mapper.map(range(50), chunksize=1, progress=False)) == 50
        assert [s.name for s in cluster.servlets] == ["books_replica_2"]
        assert "SIGKILL(-9)" in fates(mapper)["books"]


def test_a_callable_that_cannot_travel_starts_nothing() -> None:
    lock = threading.Lock()
    with pytest.raises(rm.SerializationError, match="could not be pickled"):
        rm.mapper(lambda x: (lock, x), num_replicas=3)
    # the autouse leak check fails this test if a servlet was left running


def test_a_lost_input_names_only_the_replicas_that_died_under_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with rm.mapper(crash_at, num_replicas=3, retries=1) as mapper:
        # A replica dies in an earlier map (and is replaced): no part of the next map's story.
        mapper.map(range(N), kwargs={"case": "exit", "marker": str(tmp_path / "once")}, progress=False)
        results = mapper.map(range(N), kwargs={"case": "exit"}, return_exceptions=True, progress=False)
    err = results[POISON]
    assert isinstance(err, rm.ReplicaDiedError), err
    assert err.inputs == [POISON]
    assert list(err.replicas.values()) == ["died: exit code 1"] * 2, err.replicas
    first, second = err.replicas
    assert str(err) == (
        f"input {POISON} was lost twice, each time with the replica running it: "
        f"{first} (died: exit code 1), {second} (died: exit code 1)"
    )
    assert results[:POISON] + results[POISON + 1 :] == EXPECTED[:POISON] + EXPECTED[POISON + 1 :]


def hang_or_wait(x: str, marker: str) -> str:
    """"hang" waits for "victim" to be running beside it, then outlives any timeout; "victim"
    runs until its replica is killed the first time, and answers at once the next."""
    if x == "hang":
        while not os.path.exists(marker):
            time.sleep(0.01)
        time.sleep(60)
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(60)
    return x


def test_a_timeout_charges_only_the_input_that_timed_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    kwargs = {"marker": str(tmp_path / "victim-started")}
    with rm.mapper(hang_or_wait, num_replicas=1, concurrency=2, retries=0) as mapper:
        (replica,) = mapper.replicas
        victim: list[object] = []
        # Its own map, whose timeout only the replica's death can cut short.
        beside = threading.Thread(target=lambda: victim.extend(
            mapper.map(["victim"], kwargs=kwargs, timeout=120, return_exceptions=True, progress=False)))  # fmt: skip
        beside.start()
        (hung,) = mapper.map(["hang"], kwargs=kwargs, timeout=2, return_exceptions=True, progress=False)
        beside.join(60)
        assert isinstance(hung, rm.ReplicaTimeoutError), hung
        assert victim == ["victim"], victim  # run again on the replacement, though retries=0
        assert replica.name not in {r.name for r in mapper.replicas}
        assert fates(mapper)[replica.name] == "killed after a call outlived its timeout of 2 s"
