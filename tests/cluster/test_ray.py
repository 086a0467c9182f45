"""The Ray cluster, on a real Ray: a local one, and a head with two worker nodes.

The multi-node tests share one ``ray.cluster_utils.Cluster`` (head: 1 CPU, two
workers: 2 CPUs each) for the module: starting it costs seconds, and Ray keeps
worker processes between tests on purpose. Those tests are marked
``allow_leaks``; the fixture shuts Ray down at the end of the module and checks
that no process or thread of it is left. The test that removes a node runs
last, since it leaves the cluster with one worker fewer.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from needs import need

import runmap as rm
from runmap import registry

ray = need("ray")
from ray.cluster_utils import Cluster as RayTestCluster  # noqa: E402

from runmap.cluster.ray import RayActorProcess, RayCluster  # noqa: E402

pytestmark = pytest.mark.ray

NODE_OPTIONS = {"include_dashboard": False, "object_store_memory": 80 * 1024 * 1024}
MAX_WAIT = 10.0


# ------------------------------------------------------------ what replicas run


def where(x: int) -> tuple[int, str, str]:
    """The input, the replica's name, and the Ray node it runs on (or "" off Ray)."""
    time.sleep(0.005)
    node = ""
    if "ray" in sys.modules and ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
    return x, os.environ.get("RUNMAP_REPLICA", ""), node


def slow_where(x: int) -> tuple[int, str, str]:
    time.sleep(0.03)
    return where(x)


def env_and_import() -> tuple[str, str, str]:
    import helper_in_working_dir  # type: ignore[import-not-found]

    return os.environ["RUNMAP_TEST_COLOR"], os.getcwd(), helper_in_working_dir.WORD


def joke_package() -> tuple[str, str]:
    from importlib.metadata import version

    import pyjokes  # type: ignore[import-not-found]

    return version("pyjokes"), pyjokes.__file__


# ---------------------------------------------------------------- helpers


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def _wait_until(predicate: Any, timeout: float = MAX_WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def _runmap_actors(cluster_name: str) -> list[str]:
    prefix = f"runmap:{cluster_name}:"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


# ------------------------------------------ no Ray running: these go first


def test_embedded_servlet_serves_in_a_thread_and_stops() -> None:
    from runmap.server.embedded import start_servlet
    from runmap.transport.endpoint import Endpoint
    from runmap.transport.http import HTTPChannel

    servlet = start_servlet("embedded", token="right-token")
    try:
        good = HTTPChannel(Endpoint("embedded", (servlet.host, servlet.port), "right-token"))
        bad = HTTPChannel(Endpoint("embedded", (servlet.host, servlet.port), "wrong-token"))
        assert good.info()["pid"] == os.getpid()
        with pytest.raises(rm.AuthError):
            bad.info()
        good.close()
        bad.close()
    finally:
        servlet.stop()
    assert not servlet.is_running()


def test_import_runmap_does_not_import_ray() -> None:
    subprocess.run(
        [sys.executable, "-c", "import runmap, sys; rm = runmap.cluster; assert 'ray' not in sys.modules"],
        check=True,
        timeout=60,
    )


def shout(what: str) -> str:
    print(f"shouted {what}", flush=True)
    return "ok"


def test_local_ray_runs_a_servlet_in_an_actor_and_shuts_down(capsys: pytest.CaptureFixture[str]) -> None:
    assert not ray.is_initialized(), "this test starts its own Ray: it must run before the shared cluster"
    before = _children()
    cluster = rm.cluster("ray", num_cpus=1, init_options={"include_dashboard": False})
    try:
        assert isinstance(cluster, RayCluster) and cluster.started_ray
        double = rm.function(where).to(cluster, env=rm.env(name="solo", compute={"CPU": 1}))
        servlet = double.servlet
        assert isinstance(servlet.process, RayActorProcess) and servlet.is_alive()
        x, replica, node = double(21)
        assert (x, replica, node) == (21, "solo", servlet.process.node_id)
        # What an actor prints reaches this client's stdout, prefixed, unless its cluster is quiet.
        loud = rm.function(shout).to(cluster, env=rm.env(name="loud", compute={"CPU": 0}))
        with RayCluster(name="quiet", stream_logs=False) as quiet:
            hushed = rm.function(shout).to(quiet, env=rm.env(name="hush", compute={"CPU": 0}))
            assert loud("from loud") == hushed("from hush") == "ok"
            seen = ""
            deadline = time.monotonic() + 10
            while "(loud) shouted from loud" not in seen and time.monotonic() < deadline:
                time.sleep(0.05)
                seen += capsys.readouterr().out
            assert "(loud) shouted from loud" in seen
            assert "from hush" not in seen + capsys.readouterr().out
        # `runmap status` lists the actor with its pid on this machine, which `runmap down` signals.
        [entry] = [e for e in registry.load() if e.name == cluster.name and e.pid == os.getpid()]
        assert {(s.name, s.local_pid) for s in entry.servlets} >= {("solo", servlet.pid)}
        # The token travels in the actor's constructor arguments, never on a command line.
        tokens = [s.endpoint.token for s in cluster.servlets]
        for pid in _children() - before:
            try:
                command_line = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                continue  # gone meanwhile
            assert not any(t in command_line for t in tokens)
    finally:
        cluster.close()
    assert not ray.is_initialized()
    assert _wait_until(lambda: not (_children() - before)), "Ray left processes behind"


LEFT_OPEN = """
import json, os, psutil, runmap as rm
cluster = rm.cluster("ray", num_cpus=1, init_options={"include_dashboard": False, "log_to_driver": False})
assert rm.function(os.getpid).to(cluster, env=rm.env(name="left"))() > 0
print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]))
"""


def test_a_cluster_left_open_ends_with_its_client() -> None:
    done = subprocess.run([sys.executable, "-c", LEFT_OPEN], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    ray_pids = json.loads(done.stdout.strip().splitlines()[-1])
    assert ray_pids

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    assert _wait_until(lambda: all(gone(pid) for pid in ray_pids), timeout=20), "Ray outlived its client"


# ----------------------------------------------- a head and two worker nodes


@pytest.fixture(scope="module")
def nodes() -> Iterator[RayTestCluster]:
    """A head (1 CPU, 1 custom "slot") and two workers (2 CPUs each), all on this machine."""
    before_procs = _children()
    before_threads = set(threading.enumerate())
    # The head declares a node dead after 3 missed health checks, a second apart.
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    head = {"num_cpus": 1, "resources": {"slot": 1}, "_system_config": health, **NODE_OPTIONS}
    cluster = RayTestCluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, **NODE_OPTIONS)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    assert _wait_until(lambda: not (_children() - before_procs)), "Ray left processes behind"
    # tqdm's monitor thread stays once a bar was shown (the leak fixture allows it too).
    left = lambda: {t for t in set(threading.enumerate()) - before_threads if type(t).__name__ != "TMonitor"}  # noqa: E731
    assert _wait_until(lambda: not left()), f"Ray left threads behind: {left()}"


@pytest.fixture(scope="module")
def on_ray(nodes: RayTestCluster) -> Iterator[RayCluster]:
    """runmap's cluster on those nodes, joined by address."""
    with rm.cluster("ray", address=nodes.address, name="nodes", allocation_timeout=20.0) as cluster:
        assert isinstance(cluster, RayCluster) and not cluster.started_ray
        yield cluster


def _worker_ids(nodes: RayTestCluster) -> set[str]:
    return {n.node_id for n in nodes.worker_nodes}


@pytest.mark.allow_leaks
def test_five_replicas_spread_over_all_three_nodes(nodes: RayTestCluster, on_ray: RayCluster) -> None:
    target = rm.function(where).to(on_ray, env=rm.env(name="five", compute={"CPU": 1}))
    with rm.mapper(target, num_replicas=5) as mapper:
        placed = {r.servlet.process.node_id for r in mapper.replicas}  # type: ignore[attr-defined]
        results = mapper.map(range(60), progress=False, chunksize=1)
    all_nodes = {nodes.head_node.node_id} | _worker_ids(nodes)
    assert placed == all_nodes
    assert [x for x, _, _ in results] == list(range(60))
    # User code sees Ray's runtime context: each result names the node it ran on.
    assert {node for _, _, node in results} <= all_nodes
    assert len({replica for _, replica, _ in results}) > 1
    on_ray.stop_servlet(target.servlet)


@pytest.mark.allow_leaks
def test_compute_and_env_fields_become_actor_options(on_ray: RayCluster, tmp_path: Any) -> None:
    env = rm.env(
        name="full",
        compute={"CPU": 0.5, "GPU": 1, "memory": 2**30, "slot": 1},
        reqs=["pyjokes==0.8.3"],
        env_vars={"A": "1"},
        working_dir=tmp_path,
    )
    options = on_ray.actor_options(env)
    assert (options["num_cpus"], options["num_gpus"], options["memory"]) == (0.5, 1, 2**30)
    assert options["resources"] == {"slot": 1}
    assert options["runtime_env"] == {"pip": ["pyjokes==0.8.3"], "env_vars": {"A": "1"}, "working_dir": str(tmp_path)}
    assert options["scheduling_strategy"] == "SPREAD" and options["max_restarts"] == 0
    assert on_ray.actor_options(rm.env(name="bare"))["num_cpus"] == 0  # nothing asked, nothing reserved
    with pytest.raises(rm.ConfigError, match="not a directory"):
        on_ray.actor_options(rm.env(name="nowhere", working_dir=tmp_path / "missing"))


@pytest.mark.allow_leaks
def test_env_vars_and_working_dir_reach_the_actor(on_ray: RayCluster, tmp_path: Any) -> None:
    (tmp_path / "helper_in_working_dir.py").write_text("WORD = 'uploaded'\n")
    env = rm.env(name="dirs", env_vars={"RUNMAP_TEST_COLOR": "teal"}, working_dir=tmp_path)
    remote = rm.function(env_and_import).to(on_ray, env=env)
    try:
        color, cwd, word = remote()
    finally:
        on_ray.stop_servlet(remote.servlet)
    assert (color, word) == ("teal", "uploaded")
    assert cwd != str(tmp_path)  # Ray's copy of the directory, on the node


@pytest.mark.allow_leaks
def test_a_killed_actor_is_a_dead_replica(on_ray: RayCluster) -> None:
    target = rm.function(where).to(on_ray, env=rm.env(name="doomed"))
    servlet = target.servlet
    assert isinstance(servlet.process, RayActorProcess) and servlet.is_alive()
    # Calls to a replica on another node notice that node vanishing: TCP keepalive is on.
    channel = servlet.open_channel()
    channel.info()
    sock = channel._sock  # type: ignore[attr-defined]
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    channel.close()
    ray.kill(servlet.process.actor)
    assert _wait_until(lambda: not servlet.is_alive())
    assert "killed" in servlet.exit_reason()
    with pytest.raises(rm.ReplicaDiedError):
        target(1)
    on_ray.stop_servlet(servlet)


@pytest.mark.allow_leaks
def test_compute_that_fits_nowhere_is_an_allocation_error_at_once(nodes: RayTestCluster) -> None:
    # No autoscaler can add a node here: the answer does not wait for allocation_timeout.
    with rm.cluster("ray", address=nodes.address, name="tight", allocation_timeout=120.0) as cluster:
        for compute in ({"CPU": 3}, {"accelerator_x": 1}, {"memory": 2**50}):
            started = time.monotonic()
            with pytest.raises(rm.AllocationError, match="no node.*no autoscaler") as info:
                rm.function(where).to(cluster, env=rm.env(name="huge", compute=compute))
            assert time.monotonic() - started < MAX_WAIT
            assert re.search(r"memory=\d+\.\d GB", str(info.value)) and "e+" not in str(info.value), info.value
        assert _runmap_actors("tight") == []


def test_resources_are_described_with_memory_in_gb() -> None:
    from runmap.cluster.ray.cluster import _describe_resources

    node = {"CPU": 2.0, "memory": 17375300000.0, "object_store_memory": 7e9, "node:10.0.0.1": 1.0, "slot": 1.0}
    assert _describe_resources(node) == "CPU=2, memory=17.4 GB, slot=1"
    assert _describe_resources({"memory": 80 * 1024 * 1024}) == "memory=84 MB"
    assert _describe_resources({}) == "nothing"


@pytest.mark.allow_leaks
def test_a_replica_waiting_on_busy_nodes_fails_after_the_bounded_wait(nodes: RayTestCluster) -> None:
    with rm.cluster("ray", address=nodes.address, name="busy", allocation_timeout=2.0) as cluster:
        hog = rm.function(where).to(cluster, env=rm.env(name="hog", compute={"slot": 1}))
        started = time.monotonic()
        with pytest.raises(rm.AllocationError, match="busy"):
            rm.function(where).to(cluster, env=rm.env(name="late", compute={"slot": 1}))
        assert time.monotonic() - started < 2.0 + MAX_WAIT
        assert hog(1)[0] == 1


@pytest.mark.allow_leaks
def test_close_kills_every_actor_but_leaves_a_joined_ray_running(nodes: RayTestCluster) -> None:
    cluster = rm.cluster("ray", address=nodes.address, name="short")
    rm.function(where).to(cluster, env=rm.env(name="a"))
    rm.function(where).to(cluster, env=rm.env(name="b"))
    assert len(_runmap_actors("short")) == 2
    cluster.close()
    assert ray.is_initialized()
    assert _wait_until(lambda: _runmap_actors("short") == [])


@pytest.mark.allow_leaks
def test_one_mapper_sends_work_to_local_and_ray_replicas(on_ray: RayCluster) -> None:
    with rm.LocalCluster(name="beside-ray") as local:
        here = rm.function(slow_where).to(local, env=rm.env(name="here"))
        there = rm.function(slow_where).to(on_ray, env=rm.env(name="there"))
        with rm.mapper(here, replicas=[there]) as mapper:
            results = mapper.map(range(40), progress=False, chunksize=1)
        on_ray.stop_servlet(there.servlet)
    assert [x for x, _, _ in results] == list(range(40))
    ran_on = {replica: bool(node) for _, replica, node in results}
    assert ran_on == {"here": False, "there": True}


@pytest.mark.allow_leaks
def test_reqs_are_installed_by_ray(on_ray: RayCluster) -> None:
    with pytest.raises(ImportError):
        import pyjokes  # type: ignore[import-not-found]  # noqa: F401
    env = rm.env(name="jokes", reqs=["pyjokes==0.8.3"])
    assert on_ray.runtime_env_for(env)["pip"] == ["pyjokes==0.8.3"]
    remote = rm.function(joke_package).to(on_ray, env=env)
    try:
        version, path = remote()
    finally:
        on_ray.stop_servlet(remote.servlet)
    assert version == "0.8.3"
    assert "runtime_resources" in path  # Ray's runtime_env, not this interpreter's site-packages


def node_of(x: int) -> tuple[int, str]:
    """The input and the Ray node it ran on."""
    return x, ray.get_runtime_context().get_node_id()


@pytest.mark.allow_leaks
def test_a_mapper_placed_on_ray_maps_over_every_node(
    nodes: RayTestCluster, on_ray: RayCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    all_nodes = {nodes.head_node.node_id} | _worker_ids(nodes)
    env = rm.env(name="placed", compute={"CPU": 0.5})
    before = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    with rm.mapper(node_of, num_replicas=5, env=env).to(on_ray) as placed:
        results = placed.map(range(10_000))  # with its bar
        # The Mapper runs in an actor of its own, and the replicas are actors it started, not this client.
        assert placed.num_replicas == 5
        mapper_node = placed.servlet.process.node_id  # type: ignore[attr-defined]
    assert [x for x, _ in results] == list(range(10_000))
    assert {node for _, node in results} == all_nodes
    assert mapper_node in all_nodes
    assert re.search(r"node_of: 100%.*10000/10000", capsys.readouterr().err)
    # Its replicas and its own actor end with it.
    assert _wait_until(lambda: {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)} <= before)


def _actor_names(prefix: str) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


@pytest.mark.allow_leaks
def test_a_placed_mapper_whose_replicas_fit_nowhere_says_so_and_leaves_nothing(on_ray: RayCluster) -> None:
    before = _actor_names("runmap:")
    with pytest.raises(rm.AllocationError, match="CPU"):
        rm.mapper(node_of, num_replicas=2, env=rm.env(name="huge", compute={"CPU": 64})).to(on_ray)
    assert _wait_until(lambda: _actor_names("runmap:") <= before), _actor_names("runmap:") - before


KILLED_CLIENT = """
import sys, time
sys.path[:0] = sys.argv[2:]
import runmap as rm
from test_ray import node_of

cluster = rm.cluster("ray", address=sys.argv[1], name="killed", stream_logs=False)
placed = rm.mapper(node_of, num_replicas=3, env=rm.env(name="killed", compute={"CPU": 0.5})).to(cluster)
for i, r in enumerate(placed.imap(range(10**6), chunksize=1, progress=False)):
    if i == 50:
        print("mid-map", flush=True)
"""


@pytest.mark.allow_leaks
def test_killing_the_client_of_a_placed_mapper_leaves_no_actor(nodes: RayTestCluster, on_ray: RayCluster) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    client = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, nodes.address, here, os.path.dirname(here)],
        stdout=subprocess.PIPE, text=True,
    )
    assert client.stdout is not None
    try:
        assert client.stdout.readline().strip() == "mid-map"
        # The Mapper's actor and its three replicas (named for the cluster seen from inside).
        assert len(_actor_names("runmap:killed")) == 4, _actor_names("runmap:")
        client.kill()
        client.wait(MAX_WAIT)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        client.stdout.close()
    assert _wait_until(lambda: not _actor_names("runmap:killed"), timeout=30), _actor_names("runmap:killed")


@pytest.mark.allow_leaks
def test_removing_a_node_mid_map_loses_no_input(nodes: RayTestCluster, on_ray: RayCluster) -> None:
    target = rm.function(slow_where).to(on_ray, env=rm.env(name="survivor", compute={"CPU": 1}))
    with rm.mapper(target, num_replicas=3) as mapper:
        servlets = [r.servlet for r in mapper.replicas]
        victim = next(n for n in nodes.worker_nodes if n.node_id in {s.process.node_id for s in servlets})  # type: ignore[attr-defined]
        lost = [s for s in servlets if s.process.node_id == victim.node_id]  # type: ignore[attr-defined]
        results = []
        for i, result in enumerate(mapper.imap(range(400), progress=False, chunksize=2)):
            results.append(result)
            if i == 100:
                nodes.remove_node(victim, allow_graceful=False)  # SIGKILL: the node just dies
        assert [x for x, _, _ in results] == list(range(400))
        assert not any(s.is_alive() for s in lost)
        # Ray takes a few health checks to declare the node dead; then it says so.
        assert _wait_until(lambda: "node" in lost[0].exit_reason(), timeout=30), lost[0].exit_reason()
        # The replacement goes where CPUs are left: 2 + 1 on the surviving nodes.
        ok = _wait_until(lambda: mapper.num_replicas == 3, timeout=30)
        assert ok, {r.name: r.reason for r in mapper._pool.replicas}  # what became of each replica, if not
        assert victim.node_id not in {r.servlet.process.node_id for r in mapper.replicas}  # type: ignore[attr-defined]
    on_ray.stop_servlet(target.servlet)
