"""The servlet process: loopback, the token, and never outliving its client."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import httpx
import psutil
import pytest
from processes import assert_all_end

import runmap as rm


def _servlet(cluster: rm.LocalCluster):  # type: ignore[no-untyped-def]
    rm.function(len).to(cluster)
    (servlet,) = cluster.servlets
    return servlet


def test_listens_on_loopback_only(cluster: rm.LocalCluster) -> None:
    servlet = _servlet(cluster)
    conns = [c for c in psutil.Process(servlet.pid).net_connections() if c.status == psutil.CONN_LISTEN]
    assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns)


def test_token_is_never_on_a_command_line(cluster: rm.LocalCluster) -> None:
    servlet = _servlet(cluster)
    cmdline = " ".join(psutil.Process(servlet.pid).cmdline())
    assert servlet.endpoint.token not in cmdline
    assert "runmap.server" in cmdline


def collects_a_cycle_unasked(_: object = None) -> tuple[bool, bool]:
    """Whether the collector is on, and a cycle of garbage is freed by the allocations that follow it."""
    import gc
    import weakref

    class Node:
        pass

    freed: list[bool] = []
    node = Node()
    node.me = node  # type: ignore[attr-defined]
    weakref.finalize(node, freed.append, True)
    del node
    keep = []
    for i in range(2_000_000):  # containers: each counts towards the next collection
        keep.append((i,))
        if freed:
            break
        if len(keep) > 10_000:
            keep.clear()
    return gc.isenabled(), bool(freed)


@pytest.mark.parametrize("start", ["forked", "plain"])
def test_user_code_runs_with_the_garbage_collector_on(
    cluster: rm.LocalCluster, start: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A servlet's entry turns the collector off while it imports its own stack; user code must not notice.
    if start == "plain":
        monkeypatch.setenv("RUNMAP_TEMPLATE", "0")
    remote = rm.function(collects_a_cycle_unasked).to(cluster)
    assert (psutil.Process(remote.servlet.pid).ppid() == os.getpid()) == (start == "plain")
    assert remote() == (True, True)


def policy_of_self_and_child(_: int) -> tuple[int, int]:
    import os
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"], capture_output=True, check=True
    )
    return os.sched_getscheduler(0), int(child.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")
def test_a_servlet_and_what_its_user_code_starts_run_as_batch_workers() -> None:
    import os

    with rm.mapper(policy_of_self_and_child, num_replicas=2) as mapper:
        assert mapper.map([0, 1], chunksize=1, progress=False) == [(os.SCHED_BATCH, os.SCHED_BATCH)] * 2
        for replica in mapper.replicas:  # every thread of the servlet: the calls ran in one of them
            for thread in psutil.Process(replica.servlet.pid).threads():
                assert os.sched_getscheduler(thread.id) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the client is left as it was


def test_every_route_but_health_demands_the_token(cluster: rm.LocalCluster) -> None:
    servlet = _servlet(cluster)
    base = f"http://{servlet.endpoint}"
    with httpx.Client(base_url=base) as client:
        assert client.get("/health").status_code == 200
        for method, path in [("GET", "/info"), ("PUT", "/modules/x"), ("DELETE", "/modules/x"),
                             ("POST", "/call/x/__call__"), ("GET", "/no/such/route")]:
            assert client.request(method, path).status_code == 401, path
            wrong = {"Authorization": "Bearer " + "x" * len(servlet.endpoint.token)}
            assert client.request(method, path, headers=wrong).status_code == 401, path
        good = {"Authorization": f"Bearer {servlet.endpoint.token}"}
        assert client.get("/info", headers=good).json()["pid"] == servlet.pid
        garbage = client.post("/call/x/__call__", content=b"\x80garbage", headers=good)
        assert garbage.status_code == 404  # unknown module, before any unpickling
    assert servlet.is_alive()


def test_a_wrong_token_is_an_auth_error(cluster: rm.LocalCluster) -> None:
    servlet = _servlet(cluster)
    from runmap.transport.http import HTTPChannel

    channel = HTTPChannel(dataclasses.replace(servlet.endpoint, token="not-the-token"))
    with pytest.raises(rm.AuthError):
        channel.info()
    channel.close()


def test_servlets_end_with_their_cluster(cluster: rm.LocalCluster) -> None:
    servlet = _servlet(cluster)
    proc = psutil.Process(servlet.pid)
    cluster.close()
    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_servlets_end_when_the_client_dies(how: str) -> None:
    script = textwrap.dedent(
        f"""
        import json, os, sys, time
        import runmap as rm
        cluster = rm.LocalCluster(name="orphan-test")
        rm.function(len).to(cluster)
        print(json.dumps([s.pid for s in cluster.servlets]), flush=True)
        if {how == "exit"!r}:
            os._exit(0)  # no atexit: only the servlet's own watch can notice
        time.sleep(60)
        """
    )
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    pids = json.loads(client.stdout.readline())
    if how == "sigkill":
        client.send_signal(signal.SIGKILL)
    client.wait(30)
    client.stdout.close()
    assert_all_end(pids, within=10, what="a servlet outlived its client")
