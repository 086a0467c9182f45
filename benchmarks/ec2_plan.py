"""How long the EC2 planner takes over a whole region's catalogue.

A synthetic region the size of a real one: ~700 instance types (families x sizes, some with
GPUs), each priced on demand and as spot in 6 availability zones, every type with a Spot
Advisor rate. ``plan()`` must take under 100 ms for it (issue 16); this prints the median and
worst of several runs for a few requests and fails (exit 1) if any exceeds the limit.

    .venv/bin/python benchmarks/ec2_plan.py
"""

from __future__ import annotations

import random
import statistics
import sys
import time

from runmap.cluster.ec2 import Catalog, InstanceType, RunningInstance, plan

LIMIT_MS = 100.0
ZONES = [f"us-east-1{z}" for z in "abcdef"]
SIZES = [
    ("large", 2),
    ("xlarge", 4),
    ("2xlarge", 8),
    ("4xlarge", 16),
    ("8xlarge", 32),
    ("12xlarge", 48),
    ("16xlarge", 64),
    ("24xlarge", 96),
    ("32xlarge", 128),
    ("48xlarge", 192),
]
RATES = [2.5, 8, 13.5, 19, 61]


def synthetic_catalog(n_types: int = 700, seed: int = 0) -> Catalog:
    rng = random.Random(seed)
    types, on_demand, spot, interruption = [], {}, {}, {}
    family = 0
    while len(types) < n_types:
        family += 1
        gib_per_cpu = rng.choice([2, 4, 8, 16, 32])
        gpus_per_16 = rng.choice([0, 0, 0, 0, 1, 2])
        dollars_per_cpu = rng.uniform(0.03, 0.07) * (1 + gib_per_cpu / 16)
        for size, cpu in SIZES:
            if len(types) == n_types:
                break
            name = f"f{family}.{size}"
            gpus = gpus_per_16 * cpu // 16
            memory = cpu * gib_per_cpu
            types.append(InstanceType(name, cpu=cpu, memory_gb=memory, gpus=gpus, gpu_memory_gb=24 * (gpus > 0)))
            price = round(cpu * dollars_per_cpu * (1 + 2.5 * gpus / max(cpu / 16, 1)), 4)
            on_demand[name] = price
            for zone in ZONES:
                spot[(name, zone)] = round(price * rng.uniform(0.2, 0.6), 4)
            interruption[name] = rng.choice(RATES)
    return Catalog("us-east-1", types, on_demand, spot, interruption)


REQUESTS = {
    "issue's request: 3 x 4 CPU/32 GB, <=15%": {"workers": 3, "cpu": 4, "memory_gb": 32, "max_interruption": 15},
    "100 x 1 CPU/2 GB, <=5%": {"workers": 100, "cpu": 1, "memory_gb": 2, "max_interruption": 5},
    "1000 x 1 CPU/4 GB, <=20%": {"workers": 1000, "cpu": 1, "memory_gb": 4, "max_interruption": 20},
    "8 x 1 GPU/4 CPU/16 GB, on-demand": {"workers": 8, "cpu": 4, "memory_gb": 16, "gpus": 1, "max_interruption": 0},
    "50 x 2 CPU/8 GB, 10 running, 20 blocked": {
        "workers": 50,
        "cpu": 2,
        "memory_gb": 8,
        "max_interruption": 15,
        "running": [RunningInstance(f"i-{i}", "f1.xlarge", free_cpu=4, free_memory_gb=8) for i in range(10)],
        "blocked": [(f"f{i}.2xlarge", "spot", None) for i in range(1, 21)],
    },
}


def main() -> int:
    catalog = synthetic_catalog()
    offers = len(catalog.on_demand) * len(ZONES) + len(catalog.spot)
    print(f"catalogue: {len(list(catalog.types))} types, {len(ZONES)} zones, {offers} offers (type x market x zone)")
    worst_all = 0.0
    for label, request in REQUESTS.items():
        times = []
        for _ in range(20):
            start = time.perf_counter()
            p = plan(catalog, **request)  # type: ignore[arg-type]
            times.append((time.perf_counter() - start) * 1000)
        worst_all = max(worst_all, max(times))
        print(
            f"{label:45s} median {statistics.median(times):6.1f} ms, worst {max(times):6.1f} ms"
            f"  -> {len(p.launch)} instances, ${p.price_per_hour:.4f}/hr"
        )
    ok = worst_all < LIMIT_MS
    print(f"worst {worst_all:.1f} ms: {'under' if ok else 'OVER'} the {LIMIT_MS:.0f} ms limit")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
