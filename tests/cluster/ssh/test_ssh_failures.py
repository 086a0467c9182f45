"""The crash table (tests/crashes.py), on replicas on SSH hosts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from crashes import CRASHES, check_crash, crash_at
from sshd_hosts import SshHosts

import runmap as rm
from runmap.cluster.ssh import SSHCluster


@pytest.fixture(scope="module")
def hosts(ssh_hosts: SshHosts) -> Iterator[SSHCluster]:
    with rm.cluster("ssh", hosts=["host-a", "host-b", "host-c"], name="crashes", config_file=ssh_hosts.config) as c:
        yield c  # type: ignore[misc]
    ssh_hosts.assert_clean(within=15)  # a loaded machine takes a moment to end sshd's per-connection processes


@pytest.mark.parametrize("case,options,error,pattern", CRASHES, ids=[c[0] for c in CRASHES])
def test_crash_table_on_ssh_hosts(hosts: SSHCluster, case: str, options: dict, error: type, pattern: str) -> None:
    env = rm.env(name=f"crash-{case}", compute={"CPU": 0.5})
    with rm.mapper(crash_at, cluster=hosts, env=env, num_replicas=3, **options) as mapper:
        check_crash(mapper, case, error, pattern)
