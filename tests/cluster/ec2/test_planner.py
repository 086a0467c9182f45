"""The EC2 planner: a pure function of price tables, pinned down case by case."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runmap.cluster.ec2 import (
    SPOT_ADVISOR_MIDPOINTS,
    Catalog,
    InstanceType,
    RunningInstance,
    plan,
    spot_advisor_rate,
)
from runmap.exceptions import AllocationError, ConfigError

T = InstanceType


def fixture_catalog() -> Catalog:
    """A small us-east-2 catalogue, in the spirit of the issue's example."""
    return Catalog(
        region="us-east-2",
        types=[
            T("c5.xlarge", cpu=4, memory_gb=8),
            T("m5.2xlarge", cpu=8, memory_gb=32),
            T("r5.2xlarge", cpu=8, memory_gb=64),
            T("r5n.2xlarge", cpu=8, memory_gb=64),
            T("r5.4xlarge", cpu=16, memory_gb=128),
            T("x1e.xlarge", cpu=4, memory_gb=122),
            T("g4dn.xlarge", cpu=4, memory_gb=16, gpus=1, gpu_memory_gb=16),
            T("g4dn.12xlarge", cpu=48, memory_gb=192, gpus=4, gpu_memory_gb=16),
        ],
        on_demand={
            "c5.xlarge": 0.17,
            "m5.2xlarge": 0.384,
            "r5.2xlarge": 0.504,
            "r5n.2xlarge": 0.596,
            "r5.4xlarge": 1.008,
            "x1e.xlarge": 0.834,
            "g4dn.xlarge": 0.526,
            "g4dn.12xlarge": 3.912,
        },
        spot={
            ("c5.xlarge", "us-east-2a"): 0.05,
            ("m5.2xlarge", "us-east-2a"): 0.08,
            ("r5.2xlarge", "us-east-2b"): 0.12,
            ("r5n.2xlarge", "us-east-2a"): 0.0898,
            ("r5n.2xlarge", "us-east-2b"): 0.095,
            ("r5.4xlarge", "us-east-2c"): 0.2,
            ("x1e.xlarge", "us-east-2a"): 0.01,
            ("g4dn.xlarge", "us-east-2a"): 0.16,
            ("g4dn.12xlarge", "us-east-2a"): 0.5,
        },
        interruption={
            "c5.xlarge": 2.5,
            "m5.2xlarge": 8,
            "r5.2xlarge": 2.5,
            "r5n.2xlarge": 2.5,
            "r5.4xlarge": 13.5,
            "x1e.xlarge": 61,
            "g4dn.xlarge": 8,
            "g4dn.12xlarge": 2.5,
        },
    )


def catalog_of(*offers: tuple[str, float, float, float | None, dict[str, float], float | None]) -> Catalog:
    """A catalogue from rows (name, cpu, memory_gb, on-demand price, {zone: spot price}, interruption)."""
    return Catalog(
        region="test-1",
        types=[T(name, cpu=cpu, memory_gb=mem) for name, cpu, mem, _, _, _ in offers],
        on_demand={name: od for name, _, _, od, _, _ in offers if od is not None},
        spot={(name, zone): p for name, _, _, _, zones, _ in offers for zone, p in zones.items()},
        interruption={name: rate for name, _, _, _, _, rate in offers if rate is not None},
    )


def launched(p: Any) -> list[tuple[str, str, str | None, int]]:
    return [(item.instance_type, item.market, item.zone, item.workers) for item in p.launch]


# (id, catalog, plan's keyword arguments, expected reuse, expected launches, expected $/hour)
CASES = [
    (
        "packs several workers per instance",
        catalog_of(("m.big", 16, 64, 0.8, {}, None), ("m.small", 4, 16, 0.25, {}, None)),
        {"workers": 4, "cpu": 4, "memory_gb": 16, "max_interruption": 0},
        [],
        [("m.big", "on_demand", None, 4)],
        0.8,
    ),
    (
        "price per worker beats a cheaper small type",
        catalog_of(("small", 2, 8, 0.10, {}, None), ("big", 8, 32, 0.30, {}, None)),
        {"workers": 4, "cpu": 2, "memory_gb": 8, "max_interruption": 0},
        [],
        [("big", "on_demand", None, 4)],
        0.30,
    ),
    (
        "memory limits the packing, not cpu",
        catalog_of(("lean", 16, 16, 0.2, {}, None), ("fat", 4, 64, 0.45, {}, None)),
        {"workers": 2, "cpu": 2, "memory_gb": 16, "max_interruption": 0},
        [],
        [("lean", "on_demand", None, 1), ("lean", "on_demand", None, 1)],
        0.4,
    ),
    (
        # Greedy by price per worker takes "three" ($0.30/worker), then needs one more worker and
        # takes the cheapest instance holding it: $0.90 + $0.62 = $1.52. Two "two"s cost $1.24.
        "exact covering where greedy packing misses the optimum",
        catalog_of(("three", 3, 3, 0.90, {}, None), ("two", 2, 2, 0.62, {}, None)),
        {"workers": 4, "cpu": 1, "memory_gb": 1, "max_interruption": 0},
        [],
        [("two", "on_demand", None, 2), ("two", "on_demand", None, 2)],
        1.24,
    ),
    (
        "spot within the interruption limit beats on-demand",
        catalog_of(("m5", 4, 16, 0.192, {"z-a": 0.07}, 8)),
        {"workers": 1, "cpu": 4, "memory_gb": 16, "max_interruption": 10},
        [],
        [("m5", "spot", "z-a", 1)],
        0.07,
    ),
    (
        "a tighter interruption limit forces on-demand",
        catalog_of(("m5", 4, 16, 0.192, {"z-a": 0.07}, 8)),
        {"workers": 1, "cpu": 4, "memory_gb": 16, "max_interruption": 5},
        [],
        [("m5", "on_demand", "z-a", 1)],
        0.192,
    ),
    (
        "max_interruption=0 is on-demand only",
        catalog_of(("m5", 4, 16, 0.192, {"z-a": 0.07}, 2.5)),
        {"workers": 1, "cpu": 4, "memory_gb": 16, "max_interruption": 0},
        [],
        [("m5", "on_demand", "z-a", 1)],
        0.192,
    ),
    (
        "spot priced per zone: the cheapest zone",
        catalog_of(("m5", 4, 16, 0.192, {"z-a": 0.09, "z-b": 0.06, "z-c": 0.08}, 2.5)),
        {"workers": 2, "cpu": 4, "memory_gb": 16, "max_interruption": 5},
        [],
        [("m5", "spot", "z-b", 1), ("m5", "spot", "z-b", 1)],
        0.12,
    ),
    (
        "GPU work only on GPU types",
        fixture_catalog(),
        {"workers": 2, "cpu": 2, "memory_gb": 8, "gpus": 1, "max_interruption": 10},
        [],
        [("g4dn.xlarge", "spot", "us-east-2a", 1), ("g4dn.xlarge", "spot", "us-east-2a", 1)],
        0.32,
    ),
    (
        "GPU workers packed by GPUs",
        fixture_catalog(),
        {"workers": 4, "cpu": 2, "memory_gb": 8, "gpus": 1, "max_interruption": 10},
        [],
        [("g4dn.12xlarge", "spot", "us-east-2a", 4)],
        0.5,
    ),
    (
        "max_price bounds each instance",
        catalog_of(("big", 8, 32, 0.30, {}, None), ("small", 2, 8, 0.10, {}, None)),
        {"workers": 4, "cpu": 2, "memory_gb": 8, "max_interruption": 0, "max_price": 0.2},
        [],
        [("small", "on_demand", None, 1)] * 4,
        0.40,
    ),
    (
        "reuse first, best-fit: the tightest instance that holds the workers",
        catalog_of(("m5", 4, 16, 0.192, {}, None)),
        {
            "workers": 2,
            "cpu": 1,
            "memory_gb": 4,
            "max_interruption": 0,
            "running": [
                RunningInstance("i-roomy", "m5.4xlarge", free_cpu=16, free_memory_gb=64),
                RunningInstance("i-snug", "m5.large", free_cpu=2, free_memory_gb=8),
                RunningInstance("i-full", "m5.large", free_cpu=0.5, free_memory_gb=8),
            ],
        },
        [("i-snug", 2)],
        [],
        0.0,
    ),
    (
        "reuse fills the roomiest first when none holds them all, then launches the rest",
        catalog_of(("m5", 4, 16, 0.192, {}, None)),
        {
            "workers": 6,
            "cpu": 1,
            "memory_gb": 4,
            "max_interruption": 0,
            "running": [
                RunningInstance("i-two", "m5.large", free_cpu=2, free_memory_gb=8),
                RunningInstance("i-three", "m5.xlarge", free_cpu=3, free_memory_gb=12),
            ],
        },
        [("i-three", 3), ("i-two", 2)],
        [("m5", "on_demand", None, 1)],
        0.192,
    ),
    (
        "failover: a blocked spot zone moves to the next zone",
        catalog_of(("m5", 4, 16, 0.192, {"z-a": 0.06, "z-b": 0.07}, 2.5)),
        {"workers": 1, "cpu": 4, "memory_gb": 16, "max_interruption": 5, "blocked": [("m5", "spot", "z-a")]},
        [],
        [("m5", "spot", "z-b", 1)],
        0.07,
    ),
    (
        "failover: a type blocked in every zone gives way to the next cheapest type",
        catalog_of(("m5", 4, 16, 0.192, {"z-a": 0.06}, 2.5), ("m6i", 4, 16, 0.192, {"z-a": 0.065}, 2.5)),
        {"workers": 1, "cpu": 4, "memory_gb": 16, "max_interruption": 5, "blocked": [("m5", "spot", None)]},
        [],
        [("m6i", "spot", "z-a", 1)],
        0.065,
    ),
    (
        "equal prices: the lower interruption rate wins",
        catalog_of(("risky", 4, 16, None, {"z-a": 0.05}, 13.5), ("steady", 4, 16, None, {"z-a": 0.05}, 2.5)),
        {"workers": 1, "cpu": 4, "memory_gb": 16, "max_interruption": 20},
        [],
        [("steady", "spot", "z-a", 1)],
        0.05,
    ),
    (
        "equal prices and rates: fewer instances win",
        catalog_of(("one", 1, 4, 0.1, {}, None), ("two", 2, 8, 0.2, {}, None)),
        {"workers": 2, "cpu": 1, "memory_gb": 4, "max_interruption": 0},
        [],
        [("two", "on_demand", None, 2)],
        0.2,
    ),
]


@pytest.mark.parametrize(
    ("catalog", "kwargs", "reuse", "launch", "price"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan_cases(
    catalog: Catalog,
    kwargs: dict[str, Any],
    reuse: list[tuple[str, int]],
    launch: list[tuple[str, str, str | None, int]],
    price: float,
) -> None:
    p = plan(catalog, **kwargs)
    assert p.reuse == reuse
    assert launched(p) == launch
    assert p.price_per_hour == pytest.approx(price)
    assert sum(n for _, n in p.reuse) + sum(item.workers for item in p.launch) == kwargs["workers"]


IMPOSSIBLE = [
    (
        "no type that large",
        {"workers": 1, "cpu": 64, "memory_gb": 16, "max_interruption": 10},
        "no instance type in us-east-2 is large enough for one worker of 64 CPU/16 GB",
    ),
    (
        "no GPU type with that many GPUs",
        {"workers": 1, "cpu": 1, "memory_gb": 1, "gpus": 8, "max_interruption": 10},
        "no instance type with GPUs in us-east-2 is large enough",
    ),
    (
        "every fitting offer above max_price",
        {"workers": 1, "cpu": 16, "memory_gb": 64, "max_interruption": 5, "max_price": 0.1},
        "above max_price=$0.1/hr",
    ),
    (
        "nothing under the interruption limit",
        {"workers": 1, "cpu": 4, "memory_gb": 100, "max_interruption": 10},
        "nothing under the interruption limit in test-1: 1 instance types fit a worker, but none has an "
        "on-demand price and spot needs an interruption rate of at most 10% (the lowest rate among them is 61%)",
    ),
    (
        "every fitting offer blocked",
        {
            "workers": 1,
            "cpu": 16,
            "memory_gb": 128,
            "max_interruption": 20,
            "blocked": [
                ("r5.4xlarge", "spot", None),
                ("r5.4xlarge", "on_demand", None),
                ("g4dn.12xlarge", "spot", "us-east-2a"),
                ("g4dn.12xlarge", "on_demand", None),
            ],
        },
        "blocked after failures",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), [c[1:] for c in IMPOSSIBLE], ids=[c[0] for c in IMPOSSIBLE])
def test_impossible_requests_say_why(kwargs: dict[str, Any], message: str) -> None:
    catalog = fixture_catalog()
    if "interruption limit" in message:  # only a spot type with a 61% rate holds 100 GB
        catalog = catalog_of(("x1e.xlarge", 4, 122, None, {"z-a": 0.01}, 61), ("c5", 4, 8, 0.17, {}, None))
    with pytest.raises(AllocationError, match=re.escape(message)):
        plan(catalog, **kwargs)


def test_on_demand_only_with_no_on_demand_prices_says_so() -> None:
    catalog = catalog_of(("m5", 4, 16, None, {"z-a": 0.07}, 2.5))
    with pytest.raises(AllocationError, match="max_interruption=0 means on-demand only"):
        plan(catalog, workers=1, cpu=1, memory_gb=1, max_interruption=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"workers": 0},
        {"workers": 2.5},
        {"cpu": -1},
        {"cpu": 0, "memory_gb": 0},
        {"max_interruption": 101},
        {"max_price": 0},
        {"gpus": -1},
        {"blocked": [("m5", "reserved", None)]},
    ],
)
def test_bad_requests_are_config_errors(kwargs: dict[str, Any]) -> None:
    request = {"workers": 1, "cpu": 1, "memory_gb": 1, "max_interruption": 5, **kwargs}
    with pytest.raises(ConfigError):
        plan(fixture_catalog(), **request)


def test_done_when_three_workers_one_reused_summary() -> None:
    """The issue's "done when": workers=3, cpu=4, memory_gb=32, max_interruption=15."""
    running = [RunningInstance("i-0abc", "r5.2xlarge", free_cpu=4, free_memory_gb=40)]
    p = plan(fixture_catalog(), workers=3, cpu=4, memory_gb=32, max_interruption=15, running=running)
    # The cheapest feasible: x1e.xlarge is cheaper but 61% > 15%; two m5.2xlarge (1 worker each)
    # cost $0.16; r5n.2xlarge holds 2 and is cheapest in us-east-2a, not us-east-2b.
    assert p.reuse == [("i-0abc", 1)]
    assert launched(p) == [("r5n.2xlarge", "spot", "us-east-2a", 2)]
    assert p.price_per_hour == pytest.approx(0.0898)
    assert p.launch[0].interruption == 2.5
    assert str(p) == (
        "1/3 workers allocated to existing EC2 instances: i-0abc\n"
        "Will launch 1 new EC2 instances (total $0.0898/hr) for the remaining 2 workers:\n"
        "    us-east-2a: r5n.2xlarge (8 CPU/64.0 GB), spot ($0.0898/hr, 2.5% chance of interruption), "
        "will run 2 job/worker"
    )
    # Once launched, with host names: Meadowrun's summary, word for word.
    assert p.summary(
        hosts=["ec2-3-16-123-166.us-east-2.compute.amazonaws.com"],
        reused_hosts=["ec2-18-188-55-74.us-east-2.compute.amazonaws.com"],
        launched=True,
    ) == (
        "1/3 workers allocated to existing EC2 instances: ec2-18-188-55-74.us-east-2.compute.amazonaws.com\n"
        "Launched 1 new EC2 instances (total $0.0898/hr) for the remaining 2 workers:\n"
        "    ec2-3-16-123-166.us-east-2.compute.amazonaws.com: r5n.2xlarge (8 CPU/64.0 GB), spot ($0.0898/hr, "
        "2.5% chance of interruption), will run 2 job/worker"
    )


def test_plan_is_deterministic_and_pure() -> None:
    catalog = fixture_catalog()
    before = (dict(catalog.on_demand), dict(catalog.spot), dict(catalog.interruption))
    plans = [plan(catalog, workers=7, cpu=2, memory_gb=8, max_interruption=15) for _ in range(3)]
    assert plans[0] == plans[1] == plans[2]
    assert (dict(catalog.on_demand), dict(catalog.spot), dict(catalog.interruption)) == before


@pytest.mark.parametrize(
    ("bucket", "rate"),
    [("<5%", 2.5), ("5-10%", 8), ("10-15%", 13.5), ("15-20%", 19), (">20%", 61), (0, 2.5), (4, 61), ("5 - 10%", 8)],
)
def test_spot_advisor_buckets_become_midpoints(bucket: int | str, rate: float) -> None:
    assert spot_advisor_rate(bucket) == rate


def test_spot_advisor_midpoints_table() -> None:
    assert SPOT_ADVISOR_MIDPOINTS == {"<5%": 2.5, "5-10%": 8, "10-15%": 13.5, "15-20%": 19, ">20%": 61}
    for bad in (5, -1, "25%", True, None):
        with pytest.raises(ConfigError):
            spot_advisor_rate(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------- exactness against brute force


def brute_force(catalog: Catalog, workers: int, cpu: float, memory_gb: float) -> float:
    """The cheapest on-demand covering, by trying every multiset of at most ``workers`` instances."""
    options = []
    for t in catalog.types:
        k = min(int(t.cpu // cpu), int(t.memory_gb // memory_gb))
        if k >= 1 and t.name in catalog.on_demand:
            options.append((k, round(catalog.on_demand[t.name] * 1_000_000)))
    best = None
    for n in range(1, workers + 1):
        for combo in itertools.combinations_with_replacement(options, n):
            if sum(k for k, _ in combo) >= workers:
                price = sum(p for _, p in combo)
                best = price if best is None else min(best, price)
    assert best is not None
    return best / 1_000_000


@settings(max_examples=150, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 200)), min_size=1, max_size=4, unique=True
    ),
    workers=st.integers(1, 6),
)
def test_the_plan_is_the_exact_optimum(shapes: list[tuple[int, int, int]], workers: int) -> None:
    catalog = Catalog(
        "test-1",
        [T(f"t{i}", cpu=c, memory_gb=m) for i, (c, m, _) in enumerate(shapes)],
        on_demand={f"t{i}": cents / 100 for i, (_, _, cents) in enumerate(shapes)},
    )
    p = plan(catalog, workers=workers, cpu=1, memory_gb=1, max_interruption=0)
    assert p.price_per_hour == pytest.approx(brute_force(catalog, workers, 1, 1))
    assert sum(item.workers for item in p.launch) == workers
    assert all(1 <= item.workers <= item.capacity for item in p.launch)
