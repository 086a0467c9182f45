"""The catalogue fetched from AWS: types and spot prices from moto's EC2, on-demand prices from a
Pricing API and Spot Advisor data served from fixtures on loopback (moto has neither)."""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from pathlib import Path

import pytest
from conftest import FixtureServer
from needs import need

import runmap as rm
from runmap.cluster.ec2 import Catalog, InstanceType
from runmap.cluster.ec2.fetch import (
    instance_types,
    interruption_rates,
    latest_spot_prices,
    on_demand_prices,
    spot_prices,
)
from runmap.exceptions import ClusterError

boto3 = need("boto3")


def test_instance_types_and_spot_prices_come_from_ec2(moto: str) -> None:
    ec2 = boto3.client("ec2")
    types = {t.name: t for t in instance_types(ec2)}
    assert len(types) > 300
    assert types["r5n.2xlarge"] == InstanceType("r5n.2xlarge", cpu=8, memory_gb=64)
    assert types["m6g.large"].arch == "arm64"
    assert (types["g4dn.12xlarge"].gpus, types["g4dn.12xlarge"].gpu_memory_gb) == (4, 16)

    prices = spot_prices(ec2)
    assert prices[("r5n.2xlarge", "us-east-2a")] == 0.00001  # moto's flat price
    assert {zone for _, zone in prices} <= {"us-east-2a", "us-east-2b", "us-east-2c"}


def test_the_latest_spot_price_of_each_type_and_zone_counts() -> None:
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)

    def record(zone: str, price: str, when: object) -> dict[str, object]:
        return {"InstanceType": "m5.large", "AvailabilityZone": zone, "SpotPrice": price, "Timestamp": when}

    history = [
        record("z-a", "0.05", t0),
        record("z-a", "0.04", t0 + dt.timedelta(hours=1)),
        record("z-b", "0.07", "2024-01-01T00:30:00.123456789Z"),  # as a string, with nanoseconds
        record("z-b", "0.06", t0),
    ]
    assert latest_spot_prices(history) == {("m5.large", "z-a"): 0.04, ("m5.large", "z-b"): 0.07}


def test_on_demand_prices_come_from_the_pricing_api_paged_and_cached(aws_data: FixtureServer) -> None:
    prices = on_demand_prices(boto3.session.Session(), "us-east-2")
    assert prices == {
        "c5.xlarge": 0.17,
        "m5.2xlarge": 0.384,  # the hourly on-demand term; the reserved term and a per-quantity fee are not
        "r5.4xlarge": 1.008,
        "r5n.2xlarge": 0.596,
        "x1e.xlarge": 0.834,
    }
    calls = [body for method, _, body in aws_data.requests if method == "POST"]
    assert len(calls) == 3  # 6 products, 2 a page
    filters = {f["Field"]: f["Value"] for f in calls[0]["Filters"]}
    assert calls[0]["ServiceCode"] == "AmazonEC2"
    assert filters["regionCode"] == "us-east-2" and filters["operatingSystem"] == "Linux"
    assert filters["tenancy"] == "Shared" and filters["preInstalledSw"] == "NA"
    # Cached on disk, privately: a second ask does not reach the API.
    assert on_demand_prices(boto3.session.Session(), "us-east-2") == prices
    assert len([m for m, _, _ in aws_data.requests if m == "POST"]) == 3
    cached = Path(os.environ["RUNMAP_CACHE"]) / "ec2" / "on-demand-us-east-2.json"
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600


def test_interruption_rates_are_spot_advisor_bucket_midpoints_cached_with_an_expiry(aws_data: FixtureServer) -> None:
    rates = interruption_rates("us-east-2")
    assert rates == {"c5.xlarge": 13.5, "m5.2xlarge": 8.0, "r5.4xlarge": 19.0, "r5n.2xlarge": 2.5, "x1e.xlarge": 61.0}
    assert interruption_rates("eu-west-1") == {"m5.2xlarge": 61.0}  # Linux only: no Windows rates
    gets = lambda: len([m for m, _, _ in aws_data.requests if m == "GET"])  # noqa: E731
    assert gets() == 1  # the second region came from the cache
    cached = Path(os.environ["RUNMAP_CACHE"]) / "ec2" / "spot-advisor-data.json"
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert stat.S_IMODE(cached.parent.stat().st_mode) == 0o700
    old = time.time() - 13 * 3600  # past the 12-hour expiry: fetched again
    os.utime(cached, (old, old))
    assert interruption_rates("us-east-2") == rates
    assert gets() == 2


def test_an_unreachable_source_names_itself_and_the_table_that_replaces_it(aws_data: FixtureServer) -> None:
    url = aws_data.url
    aws_data.stop()  # nothing listens there any more
    with pytest.raises(ClusterError, match=r"interruption rates \(Spot Advisor data at http://127.*interruption=\{"):
        interruption_rates("us-east-2", url=f"{url}/spot-advisor-data.json")
    with pytest.raises(ClusterError, match=r"on-demand prices \(the AWS Pricing API\).*on_demand=\{"):
        on_demand_prices(boto3.session.Session(), "us-east-2")


def test_a_cluster_fetches_what_its_catalog_leaves_out(aws_data: FixtureServer) -> None:
    # Types and spot prices from moto, on-demand prices and rates from the fixtures.
    with rm.cluster("ec2", workers=3, cpu=4, memory_gb=32, max_interruption=15, name="fetched") as cluster:
        p = cluster.plan()  # type: ignore[attr-defined]
        catalog = cluster.catalog()  # type: ignore[attr-defined]
        assert catalog.on_demand["m5.2xlarge"] == 0.384 and catalog.interruption["r5n.2xlarge"] == 2.5
        assert len(catalog.types) > 300
        # Spot at moto's flat price, only for types Spot Advisor rates within 15%.
        assert p.launch and all(item.market == "spot" and item.price_per_hour == 0.00001 for item in p.launch)
        assert {item.instance_type for item in p.launch} <= {"r5n.2xlarge", "m5.2xlarge", "c5.xlarge"}
    # A table passed is used as it is: on demand only, from the given prices.
    given = Catalog("us-east-2", [InstanceType("m5.2xlarge", cpu=8, memory_gb=32)], on_demand={"m5.2xlarge": 0.5})
    with rm.cluster("ec2", workers=2, cpu=4, memory_gb=16, max_interruption=0, catalog=given) as cluster:
        assert str(cluster.plan()).startswith("Will launch 1 new EC2 instances (total $0.5000/hr)")  # type: ignore[attr-defined]
    assert not [r for r in aws_data.requests if r[0] == "POST"][3:]  # the second cluster asked no prices
