"""The EC2 launcher against a real AWS API on loopback: moto's server, reached through AWS_ENDPOINT_URL.

moto has no Pricing API and flat spot prices, so prices come from the planner tests' fixture
catalogue; moto serves Amazon Linux's public SSM image parameters but not Canonical's Ubuntu
ones, so these tests resolve the image through the Amazon Linux parameter.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from needs import need

boto3 = need("boto3")
need("moto.server")

from botocore.exceptions import ClientError  # noqa: E402
from test_planner import fixture_catalog  # noqa: E402

from runmap.cluster.ec2.launcher import (  # noqa: E402
    AMAZON_LINUX_PARAMETER,
    SECURITY_GROUP,
    TAG_CLUSTER,
    TAG_PLAN,
    Launcher,
)
from runmap.exceptions import ClusterError  # noqa: E402

REQUEST = {"workers": 3, "cpu": 4, "memory_gb": 32, "max_interruption": 15}


def launcher(**options: Any) -> Launcher:
    lines: list[str] = []
    made = Launcher(
        "test-ec2",
        image_parameter=AMAZON_LINUX_PARAMETER,
        ssh_from="127.0.0.1/32",
        out=lines.append,
        **options,
    )
    made.lines = lines  # type: ignore[attr-defined]
    return made


def tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def test_up_launches_the_plan_tagged_with_key_and_group_and_down_leaves_nothing(moto: str, tmp_path: Path) -> None:
    ec2 = boto3.client("ec2")  # through AWS_ENDPOINT_URL, as every boto3 client
    launch = launcher()
    carried, instances = launch.up(fixture_catalog(), REQUEST)

    # The plan: r5n.2xlarge spot in its cheapest zone holds 2, m5.2xlarge spot holds the third.
    assert [(i.instance_type, i.market, i.zone, i.workers) for i in instances] == [
        ("r5n.2xlarge", "spot", "us-east-2a", 2),
        ("m5.2xlarge", "spot", "us-east-2a", 1),
    ]
    assert carried.price_per_hour == pytest.approx(0.0898 + 0.08)

    live = {i["InstanceId"]: i for i in launch.instances()}
    assert set(live) == {i.instance_id for i in instances}
    plan_ids = {tags(i)[TAG_PLAN] for i in live.values()}
    assert len(plan_ids) == 1 and len(plan_ids.pop()) == 12
    for instance in live.values():
        assert tags(instance)[TAG_CLUSTER] == "test-ec2"
        assert instance["KeyName"] == "runmap-us-east-2"
        assert instance.get("InstanceLifecycle") == "spot"
        assert [g["GroupName"] for g in instance["SecurityGroups"]] == [SECURITY_GROUP]
        behaviour = ec2.describe_instance_attribute(
            InstanceId=instance["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
        )
        assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    assert all(i.host for i in instances)

    # The key pair: in EC2, and its private key in the config dir, mode 0600.
    assert [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]] == ["runmap-us-east-2"]
    key = tmp_path / "config" / "ec2" / "runmap-us-east-2.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "PRIVATE KEY" in key.read_text()

    # The security group: SSH only, only from the client's address.
    (group,) = ec2.describe_security_groups(GroupNames=[SECURITY_GROUP])["SecurityGroups"]
    rules = [
        (r["IpProtocol"], r["FromPort"], r["ToPort"], [c["CidrIp"] for c in r["IpRanges"]])
        for r in group["IpPermissions"]
    ]
    assert rules == [("tcp", 22, 22, ["127.0.0.1/32"])]

    # A second launch reuses the key pair and the group (no duplicate rule, same key file).
    again = launcher()
    assert again.security_group() == group["GroupId"]
    assert again.key_file() == key

    assert sorted(launch.down()) == sorted(live)
    assert launch.instances() == []
    states = {
        i["State"]["Name"]
        for r in ec2.describe_instances(InstanceIds=list(live))["Reservations"]
        for i in r["Instances"]
    }
    assert states == {"terminated"}


def test_a_capacity_error_blocks_the_offer_and_plans_again(moto: str) -> None:
    launch = launcher()
    refused: list[tuple[str, str]] = []

    def no_capacity(params: dict[str, Any], **_: Any) -> None:
        zone = params.get("Placement", {}).get("AvailabilityZone")
        if params["InstanceType"] == "r5n.2xlarge" and zone == "us-east-2a":
            refused.append((params["InstanceType"], zone))
            error = {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no room"}}
            raise ClientError(error, "RunInstances")  # type: ignore[arg-type]

    launch.ec2.meta.events.register("provide-client-params.ec2.RunInstances", no_capacity)
    carried, instances = launch.up(fixture_catalog(), REQUEST)
    try:
        assert refused == [("r5n.2xlarge", "us-east-2a")]
        assert launch.lines == [  # type: ignore[attr-defined]
            "r5n.2xlarge spot in us-east-2a: InsufficientInstanceCapacity; planning again without it"
        ]
        # The next best: the same type in the next cheapest zone.
        assert [(i.instance_type, i.zone, i.workers) for i in instances] == [
            ("r5n.2xlarge", "us-east-2b", 2),
            ("m5.2xlarge", "us-east-2a", 1),
        ]
        assert carried.price_per_hour == pytest.approx(0.095 + 0.08)
        assert len(launch.instances()) == 2
    finally:
        launch.down()
    assert launch.instances() == []


def test_an_unresolvable_image_parameter_says_how_to_pass_an_image(moto: str) -> None:
    # moto serves no Canonical parameters: the default (Ubuntu) cannot be resolved there.
    launch = Launcher("test-ec2", ssh_from="127.0.0.1/32")
    with pytest.raises(ClusterError, match="pass image_id"):
        launch.image()
    assert Launcher("test-ec2", image_id="ami-12345678").image() == "ami-12345678"
    assert launch.instances() == []
