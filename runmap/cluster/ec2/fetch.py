"""The catalogue from AWS: instance types, spot and on-demand prices, interruption rates.

Four sources, each replaceable by a table passed in the :class:`~runmap.cluster.ec2.Catalog`
(a field left empty there is fetched here):

- **types**: EC2's ``DescribeInstanceTypes`` (vCPUs, memory, GPUs and their memory, architecture).
- **spot**: EC2's ``DescribeSpotPriceHistory`` for Linux/UNIX from now on: the latest price per
  type and availability zone (:func:`latest_spot_prices`).
- **on_demand**: the Pricing API's ``GetProducts`` (served from us-east-1) for Linux, shared
  tenancy, no pre-installed software (:func:`parse_price_list`); cached on disk for a week.
- **interruption**: AWS's public Spot Advisor data (``spot-advisor-data.json``), fetched with
  httpx and cached on disk for 12 hours; each type's bucket becomes its midpoint
  (:func:`~runmap.cluster.ec2.catalog.spot_advisor_rate`).

Caches live under runmap's cache directory (``$RUNMAP_CACHE``, else ``~/.cache/runmap``), in
``ec2/``, private to the user. A source that cannot be reached is a
:class:`~runmap.exceptions.ClusterError` naming it and the catalogue field that replaces it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from runmap.cluster.ec2.catalog import Catalog, InstanceType, spot_advisor_rate
from runmap.exceptions import ClusterError
from runmap.paths import cache_dir, open_private

SPOT_ADVISOR_URL = "https://spot-bid-advisor.s3.amazonaws.com/spot-advisor-data.json"
SPOT_ADVISOR_MAX_AGE = 12 * 3600.0
ON_DEMAND_MAX_AGE = 7 * 24 * 3600.0
PRICING_REGION = "us-east-1"  # the Pricing API's endpoint; it prices every region
_ARCHES = {"x86_64": "x86_64", "arm64": "arm64"}


def _unreachable(source: str, field: str, exc: BaseException) -> ClusterError:
    return ClusterError(
        f"could not fetch {source} ({type(exc).__name__}: {exc}); pass the table instead: "
        f"rm.cluster('ec2', ..., catalog=Catalog(region=..., types=[...], {field}={{...}})) "
        "(a field left empty is fetched)"
    )


# ------------------------------------------------------------------ instance types


def instance_type(record: Mapping[str, Any]) -> InstanceType | None:
    """One ``DescribeInstanceTypes`` record as an :class:`InstanceType` (None: no 64-bit architecture)."""
    arches = [a for a in record.get("ProcessorInfo", {}).get("SupportedArchitectures", []) if a in _ARCHES]
    if not arches:
        return None
    gpus = record.get("GpuInfo", {}).get("Gpus", [])
    count = sum(int(g.get("Count", 0)) for g in gpus)
    gpu_memory = max((g.get("MemoryInfo", {}).get("SizeInMiB", 0) for g in gpus), default=0) / 1024
    return InstanceType(
        str(record["InstanceType"]),
        cpu=float(record["VCpuInfo"]["DefaultVCpus"]),
        memory_gb=record["MemoryInfo"]["SizeInMiB"] / 1024,
        gpus=count,
        gpu_memory_gb=gpu_memory,
        arch=_ARCHES[arches[0]],
    )


def instance_types(ec2: Any) -> list[InstanceType]:
    """Every instance type the region offers, from ``DescribeInstanceTypes``."""
    try:
        pages = ec2.get_paginator("describe_instance_types").paginate()
        records = [r for page in pages for r in page["InstanceTypes"]]
    except Exception as exc:
        raise _unreachable("the instance types (EC2 DescribeInstanceTypes)", "types", exc) from None
    found = (instance_type(r) for r in records)
    return sorted((t for t in found if t is not None), key=lambda t: t.name)


# ------------------------------------------------------------------ spot prices


def latest_spot_prices(history: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """The latest price per ``(type, zone)`` of ``DescribeSpotPriceHistory`` records."""
    latest: dict[tuple[str, str], tuple[Any, float]] = {}
    for r in history:
        key = (str(r["InstanceType"]), str(r["AvailabilityZone"]))
        stamp = _when(r.get("Timestamp"))
        if key not in latest or stamp > latest[key][0]:
            latest[key] = (stamp, float(r["SpotPrice"]))
    return {key: price for key, (_, price) in sorted(latest.items())}


def _when(stamp: Any) -> dt.datetime:
    """A record's timestamp: boto3 gives a datetime; a string is ISO 8601 (fraction cut to microseconds)."""
    if isinstance(stamp, dt.datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)
    text = str(stamp).replace("Z", "+00:00")
    if "." in text:
        head, tail = text.split(".", 1)
        digits = len(tail) - len(tail.lstrip("0123456789"))
        text = f"{head}.{tail[: min(digits, 6)]}{tail[digits:]}"
    when = dt.datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def spot_prices(ec2: Any) -> dict[tuple[str, str], float]:
    """Linux spot prices per type and zone, now (the latest record of each)."""
    try:
        pages = ec2.get_paginator("describe_spot_price_history").paginate(
            ProductDescriptions=["Linux/UNIX"], StartTime=dt.datetime.now(dt.timezone.utc)
        )
        return latest_spot_prices(r for page in pages for r in page["SpotPriceHistory"])
    except Exception as exc:
        raise _unreachable("the spot prices (EC2 DescribeSpotPriceHistory)", "spot", exc) from None


# ------------------------------------------------------------------ on-demand prices


def parse_price_list(items: Iterable[str | Mapping[str, Any]]) -> dict[str, float]:
    """On-demand $/hour by type from the Pricing API's ``PriceList`` (JSON strings or dicts)."""
    prices: dict[str, float] = {}
    for item in items:
        product = json.loads(item) if isinstance(item, str) else item
        name = product.get("product", {}).get("attributes", {}).get("instanceType")
        if not name:
            continue
        for term in product.get("terms", {}).get("OnDemand", {}).values():
            for dimension in term.get("priceDimensions", {}).values():
                usd = dimension.get("pricePerUnit", {}).get("USD")
                if dimension.get("unit", "Hrs") == "Hrs" and usd is not None and float(usd) > 0:
                    prices[name] = min(prices.get(name, float("inf")), float(usd))
    return dict(sorted(prices.items()))


def on_demand_prices(session: Any, region: str) -> dict[str, float]:
    """Linux on-demand $/hour per type in ``region``, from the Pricing API (cached a week)."""

    def fetch() -> Any:
        pricing = session.client("pricing", region_name=PRICING_REGION)
        filters = {
            "regionCode": region,
            "operatingSystem": "Linux",
            "tenancy": "Shared",
            "preInstalledSw": "NA",
            "capacitystatus": "Used",
            "licenseModel": "No License required",
        }
        pages = pricing.get_paginator("get_products").paginate(
            ServiceCode="AmazonEC2",
            Filters=[{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in filters.items()],
        )
        return parse_price_list(item for page in pages for item in page["PriceList"])

    try:
        prices = cached_json(f"on-demand-{region}.json", ON_DEMAND_MAX_AGE, fetch)
    except Exception as exc:
        raise _unreachable("the on-demand prices (the AWS Pricing API)", "on_demand", exc) from None
    return {str(k): float(v) for k, v in prices.items()}


# ------------------------------------------------------------------ interruption rates


def spot_advisor_rates(data: Mapping[str, Any], region: str) -> dict[str, float]:
    """Interruption rates (bucket midpoints, percent) of Linux types in ``region`` from Spot Advisor data."""
    linux = data.get("spot_advisor", {}).get(region, {}).get("Linux", {})
    return {name: spot_advisor_rate(int(entry["r"])) for name, entry in sorted(linux.items()) if "r" in entry}


def interruption_rates(region: str, url: str | None = None) -> dict[str, float]:
    """Each type's interruption rate in ``region``, from AWS's Spot Advisor data (cached 12 hours).

    Args:
        region: the region.
        url: where the data is (default ``$RUNMAP_SPOT_ADVISOR_URL``, else AWS's public file).
    """
    source = url or os.environ.get("RUNMAP_SPOT_ADVISOR_URL") or SPOT_ADVISOR_URL

    def fetch() -> Any:
        import httpx

        response = httpx.get(source, timeout=30, follow_redirects=True)
        response.raise_for_status()
        return response.json()

    try:
        data = cached_json("spot-advisor-data.json", SPOT_ADVISOR_MAX_AGE, fetch, source=source)
    except Exception as exc:
        raise _unreachable(f"the interruption rates (Spot Advisor data at {source})", "interruption", exc) from None
    rates = spot_advisor_rates(data, region)
    if not rates:
        raise ClusterError(
            f"the Spot Advisor data at {source} has no Linux rates for region {region!r}; pass "
            "catalog=Catalog(..., interruption={...}) or max_interruption=0 (on demand only)"
        )
    return rates


# ------------------------------------------------------------------ the disk cache


def cached_json(name: str, max_age: float, fetch: Callable[[], Any], source: str = "") -> Any:
    """``fetch()``'s JSON, kept in runmap's cache (``ec2/<name>``, mode 0600) for ``max_age`` seconds.

    A cache written from another ``source`` does not count.
    """
    path = cache_dir("ec2") / name
    try:
        if time.time() - path.stat().st_mtime < max_age:
            cached = json.loads(path.read_text())
            if cached.get("source") == source:
                return cached["data"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    data = fetch()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w") as f:
        json.dump({"source": source, "data": data}, f)
    os.replace(tmp, path)
    return data


# ------------------------------------------------------------------ the whole catalogue


def complete_catalog(given: Catalog | None, region: str, session: Any, spot: bool = True) -> Catalog:
    """``given`` with its empty fields fetched from AWS (spot fields only if ``spot``)."""
    ec2 = session.client("ec2", region_name=region)
    types = list(given.types) if given is not None and given.types else instance_types(ec2)
    on_demand = dict(given.on_demand) if given is not None and given.on_demand else on_demand_prices(session, region)
    spot_table: dict[tuple[str, str], float] = dict(given.spot) if given is not None else {}
    rates: dict[str, float] = dict(given.interruption) if given is not None else {}
    if spot:
        spot_table = spot_table or spot_prices(ec2)
        rates = rates or interruption_rates(region)
    zones = given.zones if given is not None else ()
    return Catalog(region, types, on_demand, spot_table, rates, zones)
