"""A Mapper placed on the SSH hosts (``rm.mapper(...).to(ssh_cluster)``).

The Mapper runs in a servlet on one host and reaches every host from there with the key and
host keys the client used (runmap/cluster/ssh/access.py): each host's user runs its replicas.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sshd_hosts import SshHosts

import runmap as rm

ALL = ["host-a", "host-b", "host-c"]
HERE = Path(__file__).resolve().parent


def who(x: int) -> tuple[int, str]:
    """The input and the user (so: the host) that ran it."""
    return x, pwd.getpwuid(os.getuid()).pw_name


def test_a_mapper_placed_on_the_hosts_maps_on_every_host(
    ssh_hosts: SshHosts, capsys: pytest.CaptureFixture[str]
) -> None:
    users = {ssh_hosts.host(a).user for a in ALL}
    with rm.cluster("ssh", hosts=ALL, name="placed", config_file=ssh_hosts.config) as cluster:
        env = rm.env(name="who", compute={"CPU": 2})  # one replica a host
        with rm.mapper(who, num_replicas=3, env=env).to(cluster) as placed:
            assert sorted(r.split("@")[1] for r in placed.replicas) == ALL
            results = placed.map(range(10_000))
            local = [who(x)[0] for x in range(10_000)]
        assert [x for x, _ in results] == local
        assert {user for _, user in results} == users
        # The key the Mapper's host was given went with it.
        assert not any("inside-" in " ".join(p.cmdline()) for a in ALL for p in ssh_hosts.processes(a))
    assert re.search(r"who: 100%.*10000/10000", capsys.readouterr().err)
    ssh_hosts.assert_clean(within=15)


CLIENT = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = [{here!r}, {tests!r}]
    import runmap as rm
    from test_ssh_mapper import who

    cluster = rm.cluster("ssh", hosts={hosts!r}, name="killed", config_file={config!r})
    placed = rm.mapper(who, num_replicas=3, env=rm.env(name="who", compute={{"CPU": 2}})).to(cluster)
    for i, r in enumerate(placed.imap(range(100_000), chunksize=1, progress=False)):
        if i == 50:
            print(json.dumps(placed.replicas), flush=True)
    """
)


def test_killing_the_client_mid_map_leaves_nothing_on_the_hosts(ssh_hosts: SshHosts) -> None:
    script = CLIENT.format(here=str(HERE), tests=str(HERE.parents[1]), hosts=ALL, config=str(ssh_hosts.config))
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    try:
        replicas = json.loads(client.stdout.readline())
        assert sorted(r.split("@")[1] for r in replicas) == ALL
        assert all(any("runmap.server" in " ".join(p.cmdline()) for p in ssh_hosts.processes(a)) for a in ALL)
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        client.stdout.close()
    ssh_hosts.assert_clean(within=20)
