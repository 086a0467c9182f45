"""One seam for every cluster kind: endpoints, process handles, deaths noticed at once."""

from __future__ import annotations

import os
import pickle
import signal
import time

import runmap as rm
from runmap import registry
from runmap.cluster.process import ExitKind, ExitStatus


def ident(x: int) -> int:
    return x


def test_an_endpoint_travels_and_never_shows_its_token(cluster: rm.LocalCluster) -> None:
    remote = rm.function(ident).to(cluster)
    endpoint = remote.servlet.endpoint
    copy = pickle.loads(pickle.dumps(endpoint))
    assert copy == endpoint
    assert endpoint.token not in repr(endpoint) and endpoint.token not in str(endpoint)
    assert endpoint.token not in repr(endpoint.describe())
    channel = copy.open_channel()  # what a process holding only the endpoint does
    try:
        assert channel.info()["name"] == remote.servlet.name
    finally:
        channel.close()


def test_exit_status_is_data() -> None:
    assert str(ExitStatus.from_returncode(-9)) == "SIGKILL(-9)"
    assert str(ExitStatus.from_returncode(3)) == "exit code 3"
    assert ExitStatus.from_returncode(-11).kind is ExitKind.SIGNALED
    lost = ExitStatus(ExitKind.HOST_LOST, cause="connection to host-a closed")
    assert str(lost) == "host lost: connection to host-a closed" and not lost.crashed


def test_an_idle_replica_killed_is_noticed_within_half_a_second(cluster: rm.LocalCluster) -> None:
    remote = rm.function(ident).to(cluster)
    # No liveness probe: only the process's sentinel can tell.
    with rm.mapper(remote, num_replicas=2, replace_dead=False, liveness_timeout=None) as m:
        victim = m.replicas[1]
        assert m.map(range(10), progress=False) == list(range(10))
        os.kill(victim.servlet.pid, signal.SIGKILL)  # type: ignore[arg-type]
        killed = time.monotonic()
        while victim in m.replicas and time.monotonic() - killed < 2:
            time.sleep(0.005)
        noticed = time.monotonic() - killed
        assert victim not in m.replicas
        assert noticed < 0.5, noticed
        assert victim.servlet.exit_status() == ExitStatus(ExitKind.SIGNALED, signal=9)
        # The cluster forgot it (just after the Mapper retired it), and so did the registry `runmap status` reads.
        while victim.servlet in cluster.servlets and time.monotonic() - killed < 2:
            time.sleep(0.005)
        assert victim.servlet not in cluster.servlets
        [entry] = [e for e in registry.load() if e.name == cluster.name and e.pid == os.getpid()]
        assert victim.name not in {s.name for s in entry.servlets}


def test_a_supplied_replica_is_replaced_on_its_own_cluster(cluster: rm.LocalCluster) -> None:
    with rm.LocalCluster(name="other") as other:
        here = rm.function(ident).to(cluster)
        there = rm.function(ident).to(other)
        with rm.mapper(here, replicas=[there]) as m:
            os.kill(there.servlet.pid, signal.SIGKILL)  # type: ignore[arg-type]
            deadline = time.monotonic() + 5
            while len([r for r in m.replicas if r.servlet.cluster is other]) != 1 or there in m.replicas:
                assert time.monotonic() < deadline, m.replicas
                time.sleep(0.01)
            [replacement] = [r for r in m.replicas if r.servlet.cluster is other]
            assert replacement.name.startswith(f"{there.servlet.env.origin}_replica_")
            assert m.map(range(20), progress=False) == list(range(20))
