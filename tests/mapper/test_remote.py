"""A Mapper placed on the cluster (``rm.mapper(...).to(cluster)``): the same answers as a local one.

Here on the local cluster, where the Mapper's servlet is a process of its own whose children are
the replicas; tests/cluster/test_ray.py and tests/cluster/ssh/ place it on Ray and SSH hosts.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from crashes import check_crash, crash_at

import runmap as rm

HERE = Path(__file__).resolve().parent


def triple(x: int, plus: int = 0) -> int:
    return 3 * x + plus


def pid_of(_: int) -> int:
    return os.getpid()


class Odd(ValueError):
    pass


def fails_on_odd(x: int) -> int:
    if x % 2:
        raise Odd(f"odd {x}")
    return x


def test_results_and_order_are_a_local_mappers(cluster: rm.LocalCluster) -> None:
    local = rm.mapper(triple, num_replicas=2, cluster=cluster)
    with local, rm.mapper(triple, num_replicas=2).to(cluster) as placed:
        assert isinstance(placed, rm.RemoteMapper) and placed.num_replicas == 2
        inputs = list(range(2000))
        assert placed.map(inputs, progress=False) == local.map(inputs, progress=False)
        assert list(placed.imap(iter(inputs), chunksize=7, progress=False)) == [3 * x for x in inputs]
        assert sorted(placed.imap_unordered(inputs, progress=False)) == [3 * x for x in inputs]
        assert placed.starmap([(1, 2), (3, 4)], progress=False) == [5, 13]
        assert placed.map([], progress=False) == []
        assert placed.call(5) == 15 and placed.submit(6).result(timeout=30) == 18


def test_the_replicas_run_under_the_mappers_servlet_not_the_client(cluster: rm.LocalCluster) -> None:
    with rm.mapper(pid_of, num_replicas=2).to(cluster) as placed:
        pids = set(placed.map(range(200), chunksize=1, progress=False))
        mapper_servlet = psutil.Process(placed.servlet.pid)
        assert pids == {p.pid for p in mapper_servlet.children()}, "the Mapper's own servlet started the replicas"
        assert not pids & {p.pid for p in psutil.Process().children()}
    assert not any(psutil.pid_exists(p) for p in pids | {mapper_servlet.pid})


def test_errors_name_the_input_and_replica_and_keep_their_type(cluster: rm.LocalCluster) -> None:
    with rm.mapper(fails_on_odd, num_replicas=2).to(cluster) as placed:
        with pytest.raises(Odd, match="odd 1") as info:
            placed.map(range(10), progress=False)
        assert info.value.runmap_index == 1  # type: ignore[attr-defined]
        assert re.match(r"fails_on_odd(_replica_\d+)?$", info.value.runmap_replica)  # type: ignore[attr-defined]
        mixed = placed.map(range(6), return_exceptions=True, progress=False)
        assert [type(r) for r in mixed] == [int, Odd, int, Odd, int, Odd]
        # imap yields the results before the failure first, then raises it.
        seen = []
        with pytest.raises(Odd):
            for r in placed.imap([0, 2, 4, 5, 6], progress=False):
                seen.append(r)
        assert seen == [0, 2, 4]


def broken_inputs() -> object:
    yield from range(5)
    raise LookupError("the source broke")


def test_a_generator_that_breaks_part_way(cluster: rm.LocalCluster) -> None:
    with rm.mapper(triple, num_replicas=2).to(cluster) as placed:
        seen = []
        with pytest.raises(LookupError, match="the source broke"):
            for r in placed.imap(broken_inputs(), progress=False):
                seen.append(r)
        assert seen == [0, 3, 6, 9, 12]
        assert placed.map(range(3), progress=False) == [0, 3, 6]  # still usable


@pytest.mark.parametrize("case", ["exit", "sigkill"])
def test_the_crash_table_on_a_placed_mapper(case: str, cluster: rm.LocalCluster) -> None:
    with rm.mapper(crash_at, num_replicas=3, retries=1).to(cluster) as placed:
        why = "exit code 1" if case == "exit" else "SIGKILL"
        check_crash(placed, case, rm.ReplicaDiedError, r"inputs? 150.*" + why)


def _read_ahead(mapper: rm.Mapper | rm.RemoteMapper, taken: int) -> int:
    """How many inputs of an endless generator a map read by the time ``taken`` results came out."""
    read = itertools.count()
    results = mapper.imap((next(read) for _ in itertools.count()), chunksize=64, progress=False)
    assert list(itertools.islice(results, taken)) == [3 * x for x in range(taken)]
    results.close()  # type: ignore[attr-defined]
    return next(read)


def test_an_endless_generator_streams_in_a_window(cluster: rm.LocalCluster) -> None:
    from runmap.mapper.service import RESULTS_PER_EXCHANGE, WINDOW

    with rm.mapper(triple, num_replicas=2, cluster=cluster) as local:
        here = _read_ahead(local, 5000)
    with rm.mapper(triple, num_replicas=2).to(cluster) as placed:
        there = _read_ahead(placed, 5000)
        # What a local map reads ahead, plus the inputs in transit and the results waiting: bounded.
        assert there <= here + 2 * WINDOW + RESULTS_PER_EXCHANGE, (there, here)
        assert placed.map(range(3), progress=False) == [0, 3, 6]  # the endless map was cancelled


def echo(x: bytes) -> bytes:
    return x


def test_large_inputs_and_results_travel_in_exchanges_of_bounded_size(cluster: rm.LocalCluster) -> None:
    from runmap.mapper.service import EXCHANGE_BYTES

    blobs = [os.urandom(1 << 20) for _ in range(40)]  # distinct: pickle would send one object once
    with rm.mapper(echo, num_replicas=2).to(cluster) as placed:
        up: list[int] = []
        down: list[int] = []
        invoke = placed._invoke

        def spy(method: str, *args: object) -> object:
            reply = invoke(method, *args)
            if method == "exchange":
                up.append(len(args[1]))  # type: ignore[arg-type]
                down.append(len(reply.results))
            return reply

        placed._invoke = spy  # type: ignore[method-assign]
        assert placed.map(iter(blobs), progress=False) == blobs
    # 2,048 inputs of a MB would be 2 GB in one exchange: each direction keeps to about EXCHANGE_BYTES.
    assert max(up) <= EXCHANGE_BYTES + (2 << 20), max(up)
    assert max(down) <= EXCHANGE_BYTES + (2 << 20), max(down)
    assert sum(up) >= 40 << 20 and sum(down) >= 40 << 20, (up, down)


def test_the_client_progress_bar_counts_the_remote_map(
    cluster: rm.LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    with rm.mapper(triple, num_replicas=2).to(cluster) as placed:
        assert placed.map(range(300)) == [3 * x for x in range(300)]
    err = capsys.readouterr().err
    assert re.search(r"triple: 100%.*300/300", err), err


def test_only_a_mapper_not_yet_used_moves_and_only_with_its_own_replicas(cluster: rm.LocalCluster) -> None:
    with rm.mapper(triple, num_replicas=1, cluster=cluster) as used:
        used.map([1], progress=False)
        with pytest.raises(rm.ConfigError, match="not yet used"):
            used.to(cluster)
    remote = rm.function(triple).to(cluster)
    with pytest.raises(rm.ConfigError, match="starts its own replicas"):
        rm.mapper(remote).to(cluster)
    cluster.stop_servlet(remote.servlet)


CLIENT = textwrap.dedent(
    """
    import json, sys, time
    import runmap as rm
    sys.path[:0] = [{here!r}, {tests!r}]
    from test_remote import slow_logged

    cluster = rm.cluster("local", name="remote-client")
    placed = rm.mapper(slow_logged, num_replicas=2).to(cluster)
    print(json.dumps({{"servlet": placed.servlet.pid}}), flush=True)
    results = placed.imap(range(400), kwargs={{"log": {log!r}}}, checkpoint={checkpoint!r}, progress=False)
    for i, r in enumerate(results):
        if i == 20:
            print("mid-map", flush=True)
    print("done", flush=True)
    """
)


def slow_logged(x: int, log: str) -> int:
    with open(log, "a") as f:
        f.write(f"{x}\n")
    time.sleep(0.01)
    return 2 * x


def _tree(pid: int) -> set[int]:
    try:
        proc = psutil.Process(pid)
        return {pid} | {c.pid for c in proc.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _all_gone(pids: set[int], within: float) -> set[int]:
    deadline = time.monotonic() + within
    alive = pids
    while time.monotonic() < deadline:
        alive = {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        if not alive:
            return set()
        time.sleep(0.05)
    return alive


def test_killing_the_client_mid_map_leaves_nothing_and_the_checkpoint_resumes(tmp_path: Path) -> None:
    log, checkpoint = tmp_path / "ran.log", tmp_path / "map.ckpt"
    script = CLIENT.format(here=str(HERE), tests=str(HERE.parent), log=str(log), checkpoint=str(checkpoint))
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    try:
        servlet = json.loads(client.stdout.readline())["servlet"]
        assert client.stdout.readline().strip() == "mid-map"
        tree = _tree(servlet)
        assert len(tree) >= 3, "the Mapper's servlet and its two replicas"
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        assert _all_gone(tree, within=10) == set(), "the Mapper and its replicas outlived their client"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        client.stdout.close()
    ran_before = set(log.read_text().split())
    assert 20 <= len(ran_before) < 400
    # The next client resumes the map from the checkpoint: only the rest runs.
    log.write_text("")
    with rm.cluster("local", name="remote-resume") as cluster:
        with rm.mapper(slow_logged, num_replicas=2).to(cluster) as placed:
            results = placed.map(range(400), kwargs={"log": str(log)}, checkpoint=str(checkpoint), progress=False)
    assert results == [2 * x for x in range(400)]
    ran_after = set(log.read_text().split())
    assert len(ran_after) <= 400 - 20 and not ran_after & set(sorted(ran_before, key=int)[:20])


def test_a_silent_client_has_its_map_cancelled_and_replicas_released(cluster: rm.LocalCluster) -> None:
    placed = rm.mapper(slow_logged, num_replicas=2).to(cluster, lease=2.0)
    try:
        replicas = _tree(placed.servlet.pid) - {placed.servlet.pid}
        assert len(replicas) == 2
        placed._stop.set()  # the heartbeat stops, as it would with the client's network gone
        placed._heartbeat.join(5)
        assert _all_gone(replicas, within=10) == set(), "the replicas outlived the lease"
        with pytest.raises(rm.ClusterError, match="not heard from"):
            placed.call(1, "/dev/null")
    finally:
        placed.close()


def test_the_async_forms_and_an_async_map_left_early(cluster: rm.LocalCluster) -> None:
    import asyncio

    with rm.mapper(triple, num_replicas=2).to(cluster) as placed:

        async def main() -> tuple[list[int], list[int], list[int]]:
            whole = await placed.amap(range(500), progress=False)
            unordered = sorted([r async for r in placed.aimap_unordered(range(100), progress=False)])
            first: list[int] = []
            async for r in placed.aimap(itertools.count(), progress=False):  # endless: only a cancel ends it
                first.append(r)
                if len(first) == 10:
                    break
            return whole, unordered, first

        whole, unordered, first = asyncio.run(main())
        assert whole == [3 * x for x in range(500)]
        assert unordered == [3 * x for x in range(100)]
        assert first == [3 * x for x in range(10)]
        # The endless map was cancelled on the cluster: the service has no map running, and maps on.
        deadline = time.monotonic() + 10
        while placed._invoke("maps"):
            assert time.monotonic() < deadline, "the abandoned map still runs on the cluster"
            time.sleep(0.05)
        assert placed.map([1, 2], progress=False) == [3, 6]
