"""The EC2 cluster end to end: planned, launched in moto, reached as the test sshd hosts, mapped, ended.

moto's instances run no sshd, so the cluster's ``reach`` maps each of them to one of the test
sshd hosts (tests/sshd_hosts.py): everything else is the real path. Prices come from the
planner tests' fixture catalogue (moto has no Pricing API and flat spot prices).
"""

from __future__ import annotations

import os
import pwd
import re
import time
from collections.abc import Mapping
from typing import Any

import pytest
from needs import need
from sshd_hosts import SshHosts
from test_planner import fixture_catalog

import runmap as rm
from runmap.cluster.ec2.cluster import EC2Cluster
from runmap.cluster.ec2.launcher import AMAZON_LINUX_PARAMETER, TAG_CLUSTER, TAG_USE
from runmap.cluster.ec2.reach import SSHHost

boto3 = need("boto3")

REQUEST = {"workers": 3, "cpu": 4, "memory_gb": 32, "max_interruption": 15}


class SshdReach:
    """A reach: each moto instance, the first time it is seen, becomes the next free test sshd host."""

    def __init__(self, ssh_hosts: SshHosts, order: tuple[str, ...] = ("host-a", "host-b", "host-c")) -> None:
        self.ssh_hosts = ssh_hosts
        self.free = list(order)
        self.assigned: dict[str, str] = {}

    def __call__(self, instance: Mapping[str, Any]) -> SSHHost:
        instance_id = instance["InstanceId"]
        if instance_id not in self.assigned:
            self.assigned[instance_id] = self.free.pop(0)
        h = self.ssh_hosts.host(self.assigned[instance_id])
        return SSHHost(h.address, h.port, h.user, str(self.ssh_hosts.client_key), str(self.ssh_hosts.known_hosts))


def ec2_cluster(ssh_hosts: SshHosts, reach: SshdReach, lines: list[str], **options: Any) -> EC2Cluster:
    made = rm.cluster(
        "ec2",
        **{**REQUEST, **options},
        catalog=fixture_catalog(),
        reach=reach,
        image_parameter=AMAZON_LINUX_PARAMETER,
        ssh_from="127.0.0.1/32",
        out=lines.append,
    )
    assert isinstance(made, EC2Cluster)
    return made


def live_instances() -> list[dict[str, Any]]:
    """Every runmap instance moto does not have as terminated, asked of moto itself."""
    reservations = boto3.client("ec2").describe_instances(Filters=[{"Name": "tag-key", "Values": [TAG_CLUSTER]}])
    return [i for r in reservations["Reservations"] for i in r["Instances"] if i["State"]["Name"] != "terminated"]


def square_where(x: int) -> tuple[int, str]:
    time.sleep(0.01)
    return x * x, pwd.getpwuid(os.getuid()).pw_name


def test_run_map_plans_launches_bootstraps_maps_and_terminates(moto: str, ssh_hosts: SshHosts) -> None:
    lines: list[str] = []
    reach = SshdReach(ssh_hosts)
    cluster = ec2_cluster(ssh_hosts, reach, lines, name="e2e")
    planned = cluster.plan()
    assert live_instances() == []  # plan() launched nothing
    before = time.time()
    results = rm.run_map(square_where, range(60), cluster, progress=False, chunksize=1)
    after = time.time()

    assert [r for r, _ in results] == [x * x for x in range(60)]
    assert {user for _, user in results} == {"rmhost1", "rmhost2"}  # r5n.2xlarge holds 2, m5.2xlarge 1
    assert cluster.closed
    assert live_instances() == []
    ssh_hosts.assert_clean(within=15)

    summary = "\n".join(lines)
    assert "Launched 2 new EC2 instances (total $0.1698/hr) for 3 workers:" in summary
    assert re.search(r"ec2-[\w.-]+: r5n\.2xlarge \(8 CPU/64\.0 GB\), spot \(\$0\.0898/hr, 2\.5% chance", summary)
    # The cost: the plan's $/hour, for as long as the instances were up (within the call).
    assert cluster.cost is not None
    assert cluster.cost.price_per_hour == planned.price_per_hour == pytest.approx(0.1698)
    hours = (after - before) / 3600
    assert 0 < cluster.cost.instance_hours <= 2 * hours
    exact = sum(h * p for _, h, p in cluster.cost.instances)
    assert cluster.cost.dollars == pytest.approx(exact, abs=1e-9)  # rounded to a billionth of a dollar
    assert cluster.cost.dollars <= planned.price_per_hour * hours
    assert f"e2e: cost {cluster.cost}" in lines
    print(f"run_map on 2 moto instances / sshd hosts: {after - before:.1f} s, cost {cluster.cost}")


def test_a_second_cluster_reuses_the_instances_the_first_left_running(moto: str, ssh_hosts: SshHosts) -> None:
    lines: list[str] = []
    reach = SshdReach(ssh_hosts)
    first = ec2_cluster(ssh_hosts, reach, lines, name="first", keep_instances=True)
    with first:
        first.up()
        launched = {h.instance_id for h in first.held}
        assert rm.function(square_where).to(first)(3)[0] == 9
    assert {i["InstanceId"] for i in live_instances()} == launched  # kept for reuse, its use tags gone
    assert not any(t["Key"].startswith(TAG_USE) for i in live_instances() for t in i.get("Tags", []))
    assert any("left running for reuse" in line for line in lines)

    second = ec2_cluster(ssh_hosts, reach, lines, name="second")
    planned = second.plan()
    assert sorted(n for _, n in planned.reuse) == [1, 2] and planned.launch == []
    assert str(planned).startswith("3/3 workers allocated to existing EC2 instances: i-")
    with second:
        results = rm.run_map(square_where, range(20), second, progress=False)
        assert [r for r, _ in results] == [x * x for x in range(20)]
        assert {h.instance_id for h in second.held} == launched and not any(h.launched for h in second.held)
    assert second.cost is not None and second.cost.dollars == 0  # it launched nothing
    # The last cluster to leave an instance terminates it.
    assert live_instances() == []
    ssh_hosts.assert_clean(within=15)


def test_a_spot_interruption_mid_map_loses_no_input(moto: str, ssh_hosts: SshHosts) -> None:
    lines: list[str] = []
    reach = SshdReach(ssh_hosts)
    cluster = ec2_cluster(ssh_hosts, reach, lines, name="interrupted")
    try:
        with cluster, rm.mapper(square_where, cluster=cluster, num_replicas=3) as m:
            results = m.imap(range(120), chunksize=1, progress=False)
            got = [next(results) for _ in range(20)]
            # AWS takes back the instance reached as host-b: it is terminated, its host goes away.
            (victim,) = [i for i, alias in reach.assigned.items() if alias == "host-b"]
            boto3.client("ec2").terminate_instances(InstanceIds=[victim])
            ssh_hosts.kill("host-b", user_processes=True)
            got += list(results)
            assert [r for r, _ in got] == [x * x for x in range(120)]
            # A replacement was planned, launched, and reached as host-c (maybe after the map's end:
            # the other replicas may finish its inputs first).
            deadline = time.monotonic() + 60
            while "host-c" not in reach.assigned.values():
                assert time.monotonic() < deadline, reach.assigned
                time.sleep(0.05)
            (new,) = [i for i, alias in reach.assigned.items() if alias == "host-c"]
            (new_host,) = [h.host for h in cluster.held if h.instance_id == new]
            while not any(r.servlet.host == new_host and r.servlet.is_alive() for r in m.replicas):
                assert time.monotonic() < deadline, [r.servlet for r in m.replicas]
                time.sleep(0.05)
            assert [r for r, _ in m.map(range(30), progress=False)] == [x * x for x in range(30)]
        assert any("launching one more worker" in line for line in lines)
        assert live_instances() == []
    finally:
        ssh_hosts.start("host-b")
    ssh_hosts.assert_clean(within=15)


def test_runmap_status_lists_the_instances_and_runmap_down_terminates_them(
    moto: str, ssh_hosts: SshHosts, capsys: pytest.CaptureFixture[str]
) -> None:
    from runmap import cli

    lines: list[str] = []
    name = f"cli-ec2-{os.getpid()}"
    cluster = ec2_cluster(ssh_hosts, SshdReach(ssh_hosts), lines, name=name)
    try:
        assert rm.function(square_where).to(cluster)(4)[0] == 16
        ids = sorted(h.instance_id for h in cluster.held)
        capsys.readouterr()
        assert cli.main(["status"]) == 0
        out = capsys.readouterr().out
        assert f"EC2 cluster {name} (us-east-2): 2 instances, $0.1698/hr launched" in out
        rows = [line.split() for line in out.splitlines() if line.strip().startswith("i-")]
        assert sorted(r[0] for r in rows if r[0] in ids) == ids
        assert {(r[1], r[2], r[4]) for r in rows if r[0] in ids} == {
            ("r5n.2xlarge", "spot", "0.0898"),
            ("m5.2xlarge", "spot", "0.0800"),
        }

        assert cli.main(["down", name]) == 0
        out = capsys.readouterr().out
        assert f"{name}: terminated EC2 instances {', '.join(ids)}" in out
        assert live_instances() == []
        deadline = time.monotonic() + 30
        while not cluster.closed:  # its client closes it as its servlets end
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        cluster.close()
    ssh_hosts.assert_clean(within=15)


def test_a_mapper_placed_on_the_instances_maps_there_and_ends_with_them(moto: str, ssh_hosts: SshHosts) -> None:
    lines: list[str] = []
    reach = SshdReach(ssh_hosts)
    cluster = ec2_cluster(ssh_hosts, reach, lines, name="placed-ec2")
    with cluster:
        with rm.mapper(square_where, num_replicas=3).to(cluster) as placed:
            # The Mapper runs on one instance and starts its replicas on the instances held.
            users = {ssh_hosts.host(alias).user for alias in reach.assigned.values()}
            assert {r.split("@")[1] for r in placed.replicas} == {h.host for h in cluster.held}
            results = placed.map(range(300), progress=False)
        assert [r for r, _ in results] == [x * x for x in range(300)]
        assert {user for _, user in results} <= users and len({user for _, user in results}) > 1
    assert live_instances() == []
    ssh_hosts.assert_clean(within=15)
