"""The SSH cluster on three real sshd hosts (tests/sshd_hosts.py): placement, host loss, clean-up.

The hosts are users of this machine, each with its own home, reached through
OpenSSH with verified host keys. A host runs the Python it has (Debian's
``/usr/bin/python3``), in an env that runmap builds there on first use.
"""

from __future__ import annotations

import os
import pwd
import signal
import time
from collections.abc import Iterator

import pytest
from sshd_hosts import SshHosts

import runmap as rm
from runmap.cluster.process import ExitKind
from runmap.cluster.ssh import SSHCluster

ALL = ["host-a", "host-b", "host-c"]


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor
        print(f"scaler ready on {pwd.getpwuid(os.getuid()).pw_name}")

    def apply(self, x: int) -> tuple[int, str]:
        if x % 100 == 0:
            print(f"applying to {x}")
        time.sleep(0.002)
        return x * self.factor, pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def hosts(ssh_hosts: SshHosts) -> Iterator[SSHCluster]:
    with rm.cluster("ssh", hosts=ALL, name="hosts", config_file=ssh_hosts.config) as cluster:
        yield cluster  # type: ignore[misc]
    ssh_hosts.assert_clean(within=15)  # a loaded machine takes a moment to end sshd's per-connection processes


def test_a_method_maps_over_three_hosts_placed_by_compute(
    ssh_hosts: SshHosts, hosts: SSHCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    env = rm.env(name="scaler", compute={"CPU": 2})  # each host has 2 CPUs: one replica each
    model = rm.module(Scaler).to(hosts, env=env)(factor=3)
    with rm.mapper(model.apply, num_replicas=3) as m:
        assert sorted(r.servlet.host for r in m.replicas) == ALL
        results = m.map(range(300), chunksize=1, progress=False)
        assert [x for x, _ in results] == [3 * x for x in range(300)]
        assert {user for _, user in results} == set(ssh_hosts.users)
        with pytest.raises(rm.AllocationError, match="host-a has CPU=2"):
            m.add_replicas(1)  # no host has 2 CPUs free
    out = capsys.readouterr().out
    assert "(scaler) scaler ready on rmhost1" in out
    assert "applying to 0" in out


def test_a_second_cluster_on_the_same_hosts_does_not_rebuild(ssh_hosts: SshHosts, hosts: SSHCluster) -> None:
    started = time.monotonic()
    with rm.cluster("ssh", hosts=ALL, name="again", config_file=ssh_hosts.config) as again:
        elapsed = time.monotonic() - started
        assert not any(again.host_info(h, rm.env()).built for h in ALL)
        double = rm.function(lambda x: 2 * x).to(again)
        assert double(21) == 42
    print(f"second cluster on 3 hosts ready in {elapsed:.2f} s")
    assert elapsed < 15, elapsed


def test_the_token_is_not_on_any_command_line_of_a_host(ssh_hosts: SshHosts, hosts: SSHCluster) -> None:
    env = rm.env(name="t", compute={"CPU": 0.5})
    with rm.mapper(rm.function(os.getpid).to(hosts, env=env), num_replicas=6):
        commands = [" ".join(p.cmdline()) for alias in ALL for p in ssh_hosts.processes(alias)]
        assert any("runmap.server" in c for c in commands), commands
        tokens = [s.endpoint.token for s in hosts.servlets]
        assert len(tokens) == 6 and not any(t in c for t in tokens for c in commands)


def test_a_hosts_servlet_listens_on_no_port_only_on_a_private_socket_file_it_removes(
    ssh_hosts: SshHosts, hosts: SSHCluster
) -> None:
    # Another user of a host could bind a loopback port once its servlet ended, and receive what
    # the client sends there; a file in the host user's private directory no one else can take.
    import stat

    import psutil

    env = rm.env(name="sockets", compute={"CPU": 0.5})
    with rm.mapper(rm.function(abs).to(hosts, env=env), num_replicas=3) as m:
        assert m.map(range(-30, 0), progress=False) == list(range(30, 0, -1))
        files = {}
        for replica in m.replicas:
            process = psutil.Process(replica.servlet.pid)
            assert process.username() in ssh_hosts.users
            assert not [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            [path] = {c.laddr for c in process.net_connections(kind="unix") if c.laddr.endswith(".sock")}
            directory = os.stat(os.path.dirname(path))
            assert directory.st_uid == process.uids().real and stat.S_IMODE(directory.st_mode) == 0o700
            files[replica.servlet.name] = path
        # One killed outright leaves its file, which the next servlet to start on that host (here: its
        # replacement, packed into the room left on host-a) removes.
        killed = m.replicas[-1].servlet
        assert {r.servlet.host for r in m.replicas} == {"host-a"}  # 3 x 0.5 of its 2 CPUs
        os.kill(killed.pid, signal.SIGKILL)
        assert m.map(range(-30, 0), progress=False) == list(range(30, 0, -1))
        deadline = time.monotonic() + 30
        while os.path.exists(files[killed.name]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(files[killed.name])
        for replica in m.replicas:
            files[replica.servlet.name] = f"{os.path.dirname(files[killed.name])}/{replica.servlet.pid}.sock"
    hosts.close()  # the others leave on their own, and remove their files
    assert not [f for f in files.values() if os.path.exists(f)]


def test_killing_a_host_mid_map_loses_nothing(ssh_hosts: SshHosts, hosts: SSHCluster) -> None:
    env = rm.env(name="lossy", compute={"CPU": 1})
    model = rm.module(Scaler).to(hosts, env=env)(factor=2)
    try:
        with rm.mapper(model.apply, num_replicas=4, retries=3) as m:
            before = sorted(r.servlet.host for r in m.replicas)
            assert before == ["host-a", "host-a", "host-b", "host-b"]  # packed: host-a, then host-b
            lost = [r.servlet for r in m.replicas if r.servlet.host == "host-b"]
            results = []
            for i, (x, _) in enumerate(m.imap(range(300), chunksize=1, progress=False)):
                results.append(x)
                if i == 60:
                    ssh_hosts.kill("host-b")
            assert results == [2 * x for x in range(300)]
            assert all(s.exit_status() is not None and s.exit_status().kind is ExitKind.HOST_LOST for s in lost)
            deadline = time.monotonic() + 30
            while sorted(r.servlet.host for r in m.replicas) != ["host-a", "host-a", "host-c", "host-c"]:
                assert time.monotonic() < deadline, [r.servlet.host for r in m.replicas]
                time.sleep(0.05)
    finally:
        ssh_hosts.start("host-b")
    ssh_hosts.assert_clean("host-b", within=10)  # its servlets left when their sessions ended


def test_a_replica_placed_on_a_host_that_just_went_away_starts_on_the_next(
    ssh_hosts: SshHosts, hosts: SSHCluster
) -> None:
    # No session of host-a has ended yet, so nothing has told the placement that host-a is gone:
    # a replacement for one of its replicas can be in exactly this spot.
    ssh_hosts.kill("host-a")
    try:
        fn = rm.function(os.getpid).to(hosts, env=rm.env(name="moved", compute={"CPU": 1}))
        assert fn.servlet.host == "host-b"
        assert isinstance(fn(), int)
        assert hosts.placement.lost == {"host-a"}
    finally:
        ssh_hosts.start("host-a")


def test_an_idle_remote_replica_killed_is_noticed_at_once(ssh_hosts: SshHosts, hosts: SSHCluster) -> None:
    env = rm.env(name="idle", compute={"CPU": 1})
    fn = rm.function(os.getpid).to(hosts, env=env)
    with rm.mapper(fn, num_replicas=2, replace_dead=False, liveness_timeout=None) as m:
        victim = m.replicas[1]
        os.kill(victim.servlet.pid, signal.SIGKILL)  # type: ignore[arg-type]  # the host's pid: same machine here
        killed = time.monotonic()
        while victim in m.replicas and time.monotonic() - killed < 5:
            time.sleep(0.01)
        assert victim not in m.replicas
        assert time.monotonic() - killed < 1.0
        status = victim.servlet.exit_status()
        assert status is not None and status.kind is ExitKind.SIGNALED and status.signal == 9, status


def test_a_compute_that_fits_nowhere_names_what_each_host_has(hosts: SSHCluster) -> None:
    with pytest.raises(rm.AllocationError) as info:
        rm.function(os.getpid).to(hosts, env=rm.env(name="huge", compute={"CPU": 64}))
    for alias in ALL:
        assert f"{alias} has CPU=2" in str(info.value)


def chatter(n: int) -> int:
    for i in range(n):
        print(f"line {i:06d} " + "x" * 60)
    return n


def test_a_replicas_log_is_capped_on_the_client_and_streamed_whole(
    ssh_hosts: SshHosts, capsys: pytest.CaptureFixture[str]
) -> None:
    cap, n = 64 * 1024, 20_000  # ~1.5 MB of output through a 64 KiB cap
    with rm.cluster("ssh", hosts=["host-a"], name="capped", config_file=ssh_hosts.config, log_max_bytes=cap) as c:
        talk = rm.function(chatter).to(c, env=rm.env(name="talker"))
        assert talk(n) == n
        log = talk.servlet.process.log
        assert log is not None
    # Listed once the cluster is closed: until then the client's copier may be between renaming
    # talker.log and opening the next one.
    files = sorted(log.parent.glob("talker.log*"))
    assert [f.name for f in files] == ["talker.log", "talker.log.1"]
    assert all(f.stat().st_size <= cap for f in files), [f.stat().st_size for f in files]
    on_disk = [line for f in reversed(files) for line in f.read_text().splitlines() if line.startswith("line ")]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("(talker) line ")]
    assert int(on_disk[-1].split()[1]) == n - 1, on_disk[-3:]
    assert [int(line.split()[2]) for line in lines] == list(range(n))
    ssh_hosts.assert_clean(within=15)
