"""Remote functions and classes, called one at a time."""

from __future__ import annotations

import os

import pytest

import runmap as rm


def triple(x: int) -> int:
    return 3 * x


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.n = start

    def add(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def pid(self) -> int:
        return os.getpid()


class Broken:
    def __init__(self) -> None:
        raise RuntimeError("cannot build")


def test_remote_function(cluster: rm.LocalCluster) -> None:
    remote = rm.function(triple).to(cluster)
    assert remote(14) == 42


def test_lambda_and_closure_travel_by_value(cluster: rm.LocalCluster) -> None:
    k = 7
    assert rm.function(lambda x: x + k).to(cluster)(1) == 8

    def make_adder(n: int):  # type: ignore[no-untyped-def]
        def adder(x: int) -> int:
            return x + n

        return adder

    assert rm.function(make_adder(5)).to(cluster)(1) == 6


def test_remote_class_keeps_state_in_its_servlet(cluster: rm.LocalCluster) -> None:
    env = rm.env(name="counter")
    RemoteCounter = rm.module(Counter).to(cluster, env=env)
    counter = RemoteCounter(start=10)
    assert counter.add(5) == 15
    assert counter.add(k=2) == 17
    assert counter.pid() != os.getpid()
    other = RemoteCounter()
    assert other.add() == 1  # a second instance, same servlet, own state
    assert other.pid() == counter.pid()


def test_init_error_arrives_as_itself(cluster: rm.LocalCluster) -> None:
    with pytest.raises(RuntimeError, match="cannot build"):
        rm.module(Broken).to(cluster)()


def test_unknown_method_is_a_clear_error(cluster: rm.LocalCluster) -> None:
    counter = rm.module(Counter).to(cluster)()
    with pytest.raises(rm.ProtocolError, match="no method 'nope'"):
        counter.nope()


def test_env_vars_and_working_dir_reach_the_replica(cluster: rm.LocalCluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = rm.env(name="configured", env_vars={"RUNMAP_TEST_VAR": "hello"}, working_dir=tmp_path)
    remote = rm.function(lambda: (os.environ["RUNMAP_TEST_VAR"], os.getcwd())).to(cluster, env=env)
    assert remote() == ("hello", str(tmp_path))


def test_env_validation() -> None:
    with pytest.raises(rm.ConfigError):
        rm.env(compute={"CPU": -1})
    with pytest.raises(rm.ConfigError):
        rm.env(name="a/b")
    assert rm.env(name="m").replicate(3).name == "m_replica_3"
    assert rm.env(name="m").replicate(3).replicate(4).name == "m_replica_4"


def test_a_module_of_a_closed_cluster_says_the_cluster_is_closed() -> None:
    with rm.LocalCluster(name="shut") as cluster:
        remote = rm.function(triple).to(cluster)
        RemoteCounter = rm.module(Counter).to(cluster, env=rm.env(name="counting"))
        counter = RemoteCounter()
        assert remote(1) == 3 and counter.add() == 1
    for call in (lambda: remote(1), counter.add, RemoteCounter, remote.remove):
        with pytest.raises(rm.ClusterError, match="cluster 'shut' is closed"):
            call()

