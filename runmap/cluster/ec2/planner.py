"""The EC2 planner: the cheapest instances that give every worker what it asks for.

:func:`plan` is a pure, deterministic function of a :class:`~runmap.cluster.ec2.catalog.Catalog`
and a request (``workers`` workers, each ``cpu`` vCPUs, ``memory_gb`` GiB and ``gpus`` GPUs, with
at most ``max_interruption`` percent chance of a spot interruption), so that it can be used offline
and pinned down by tests. The rules:

- A worker fits on an instance by every resource: an instance holds
  ``min(cpu // worker cpu, memory // worker memory, gpus // worker gpus)`` workers.
  GPU work goes only to types with GPUs.
- Instances runmap already runs (``running``) are used first, best-fit: the one whose
  free room holds the workers left most tightly, else the roomiest, again and again.
- The workers left are covered by the cheapest combination of instances to launch, found
  exactly by dynamic programming over worker counts (not Meadowrun's greedy packing by
  price per worker, which misses the optimum on some catalogues). Ties go to the lower
  total interruption rate (the sum over the instances), then to fewer instances.
- Each type is offered on demand (where the catalogue prices it) and as spot in its
  cheapest availability zone, only when its interruption rate is at most
  ``max_interruption`` (``0``: on-demand only). ``max_price`` bounds the $/hour of each
  instance; ``blocked`` takes ``(type, market, zone)`` offers out (failover after a
  capacity error; a zone of None blocks every zone).
- An impossible request raises :class:`~runmap.exceptions.AllocationError` saying why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from runmap.cluster.ec2.catalog import Catalog, InstanceType, RunningInstance
from runmap.exceptions import AllocationError, ConfigError

SPOT = "spot"
ON_DEMAND = "on_demand"
MARKETS = (SPOT, ON_DEMAND)

# Prices are compared in millionths of a dollar and rates in hundredths of a percent, as
# integers, so that sums of them compare exactly (0.1 + 0.2 == 0.3).
_PRICE_UNIT = 1_000_000
_RATE_UNIT = 100
_EPSILON = 1e-9


@dataclass(frozen=True)
class Launch:
    """One instance to launch.

    Attributes:
        instance_type: its type's name.
        market: ``"spot"`` or ``"on_demand"``.
        zone: the availability zone to launch in (None: any zone).
        workers: how many workers it will run.
        price_per_hour: what it costs, in $/hour.
        interruption: its type's spot interruption rate in percent (0 on demand).
        cpu: its vCPUs.
        memory_gb: its memory in GiB.
        gpus: its GPUs.
        capacity: how many workers of this request it could hold.
    """

    instance_type: str
    market: str
    zone: str | None
    workers: int
    price_per_hour: float
    interruption: float = 0.0
    cpu: float = 0
    memory_gb: float = 0
    gpus: int = 0
    capacity: int = 0

    def describe(self) -> str:
        """``r5n.2xlarge (8 CPU/64.0 GB), spot ($0.0898/hr, 2.5% chance of interruption)``."""
        gpus = f", {self.gpus} GPU" if self.gpus else ""
        if self.market == SPOT:
            market = f"spot (${self.price_per_hour:.4f}/hr, {self.interruption:g}% chance of interruption)"
        else:
            market = f"on-demand (${self.price_per_hour:.4f}/hr)"
        return f"{self.instance_type} ({self.cpu:g} CPU/{self.memory_gb:.1f} GB{gpus}), {market}"


@dataclass(frozen=True)
class Plan:
    """What to reuse and what to launch for a request; ``print(plan)`` summarizes it.

    Attributes:
        workers: the workers asked for.
        reuse: ``(instance id, workers placed there)`` for each running instance used.
        launch: the instances to launch, one :class:`Launch` each.
        region: the catalogue's region.
    """

    workers: int
    reuse: list[tuple[str, int]] = field(default_factory=list)
    launch: list[Launch] = field(default_factory=list)
    region: str = ""

    @property
    def price_per_hour(self) -> float:
        """$/hour of the instances to launch (the reused ones are already paid for)."""
        return round(sum(round(item.price_per_hour * _PRICE_UNIT) for item in self.launch) / _PRICE_UNIT, 6)

    @property
    def reused_workers(self) -> int:
        return sum(n for _, n in self.reuse)

    def summary(
        self, hosts: Sequence[str] | None = None, launched: bool = False, reused_hosts: Sequence[str] | None = None
    ) -> str:
        """The summary Meadowrun prints.

        Args:
            hosts: the launched instances' host names, in the order of ``launch``
                (by default each instance is named by its zone).
            launched: say "Launched" (after ``up()``) instead of "Will launch".
            reused_hosts: the reused instances' host names (by default their ids).
        """
        lines = []
        if self.reuse:
            names = list(reused_hosts) if reused_hosts is not None else [i for i, _ in self.reuse]
            lines.append(
                f"{self.reused_workers}/{self.workers} workers allocated to existing EC2 instances: {', '.join(names)}"
            )
        if self.launch:
            left = self.workers - self.reused_workers
            verb = "Launched" if launched else "Will launch"
            whom = f"the remaining {left} workers" if self.reuse else f"{left} workers"
            lines.append(
                f"{verb} {len(self.launch)} new EC2 instances (total ${self.price_per_hour:.4f}/hr) for {whom}:"
            )
            for i, item in enumerate(self.launch):
                name = hosts[i] if hosts is not None else (item.zone or f"{self.region} (any zone)")
                lines.append(f"    {name}: {item.describe()}, will run {item.workers} job/worker")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _fits(cpu_have: float, memory_have: float, gpus_have: float, cpu: float, memory_gb: float, gpus: int) -> int:
    """How many workers fit in what is had, by every resource asked for."""
    n = math.inf
    if cpu > 0:
        n = min(n, math.floor(cpu_have / cpu + _EPSILON))
    if memory_gb > 0:
        n = min(n, math.floor(memory_have / memory_gb + _EPSILON))
    if gpus > 0:
        n = min(n, math.floor(gpus_have / gpus + _EPSILON))
    return max(0, int(n))


def _worker(cpu: float, memory_gb: float, gpus: int) -> str:
    gpu = f", {gpus} GPU" if gpus else ""
    return f"{cpu:g} CPU/{memory_gb:g} GB{gpu}"


def check_request(
    workers: int, cpu: float, memory_gb: float, max_interruption: float, gpus: int, max_price: float | None
) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, not {workers!r}")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ConfigError(f"gpus must be a non-negative integer, not {gpus!r}")
    if cpu < 0 or memory_gb < 0:
        raise ConfigError(f"cpu and memory_gb must not be negative (cpu={cpu!r}, memory_gb={memory_gb!r})")
    if cpu == 0 and memory_gb == 0 and gpus == 0:
        raise ConfigError("a worker must ask for some cpu, memory_gb or gpus")
    if not 0 <= max_interruption <= 100:
        raise ConfigError(f"max_interruption is a percentage from 0 to 100, not {max_interruption!r}")
    if max_price is not None and max_price <= 0:
        raise ConfigError(f"max_price must be positive, not {max_price!r}")


def _reuse(
    running: Iterable[RunningInstance], workers: int, cpu: float, memory_gb: float, gpus: int
) -> list[tuple[str, int]]:
    """Best-fit onto running instances: the tightest that holds what is left, else the roomiest."""
    slots: list[tuple[int, str]] = []
    seen: set[str] = set()
    for inst in running:
        if inst.instance_id in seen:
            raise ConfigError(f"running instance {inst.instance_id!r} is listed twice")
        seen.add(inst.instance_id)
        n = _fits(inst.free_cpu, inst.free_memory_gb, inst.free_gpus, cpu, memory_gb, gpus)
        if n > 0:
            slots.append((n, inst.instance_id))
    reuse: list[tuple[str, int]] = []
    left = workers
    while left and slots:
        holding = [s for s in slots if s[0] >= left]
        chosen = min(holding) if holding else min(slots, key=lambda s: (-s[0], s[1]))
        slots.remove(chosen)
        take = min(left, chosen[0])
        reuse.append((chosen[1], take))
        left -= take
    return reuse


# An offer: (price in millionths, rate in hundredths, tie-break names...) and the Launch it makes.
_Key = tuple[int, int, str, str, str]


def _offers(
    catalog: Catalog,
    left: int,
    cpu: float,
    memory_gb: float,
    max_interruption: float,
    gpus: int,
    max_price: float | None,
    blocked: Iterable[tuple[str, str, str | None]],
) -> dict[int, tuple[_Key, Launch]]:
    """The best offer for each number of workers an instance holds (capped at ``left``)."""
    blocked_set = set(blocked)
    for _, market, _ in blocked_set:
        if market not in MARKETS:
            raise ConfigError(f"blocked offers name a market {market!r}; expected 'spot' or 'on_demand'")

    def is_blocked(name: str, market: str, zone: str | None) -> bool:
        return (name, market, zone) in blocked_set or (name, market, None) in blocked_set

    spot_by_type: dict[str, list[tuple[float, str]]] = {}
    for (name, zone), price in catalog.spot.items():
        spot_by_type.setdefault(name, []).append((price, zone))
    zones: tuple[str, ...] = tuple(catalog.zones)

    types: tuple[InstanceType, ...] = tuple(catalog.types)
    fitting = 0
    in_market: list[tuple[float, str]] = []  # (price, type) of offers allowed by the interruption limit
    under_price = 0
    lowest_rate: float | None = None
    best: dict[int, tuple[_Key, Launch]] = {}
    for t in types:
        if gpus > 0 and t.gpus < gpus:
            continue
        capacity = _fits(t.cpu, t.memory_gb, t.gpus, cpu, memory_gb, gpus)
        if capacity < 1:
            continue
        fitting += 1
        k = min(capacity, left)
        candidates: list[tuple[str, str | None, float, float]] = []  # market, zone, price, rate
        on_demand = catalog.on_demand.get(t.name)
        if on_demand is not None:
            in_market.append((on_demand, t.name))
            if max_price is None or on_demand <= max_price + _EPSILON:
                under_price += 1
                any_zone: tuple[str | None, ...] = zones or (None,)
                for od_zone in any_zone:
                    if not is_blocked(t.name, ON_DEMAND, od_zone):
                        candidates.append((ON_DEMAND, od_zone, on_demand, 0.0))
                        break
        rate = catalog.interruption.get(t.name)
        if rate is not None and t.name in spot_by_type:
            lowest_rate = rate if lowest_rate is None else min(lowest_rate, rate)
        if max_interruption > 0 and rate is not None and rate <= max_interruption and t.name in spot_by_type:
            spot = sorted(spot_by_type[t.name])
            in_market.append((spot[0][0], t.name))
            affordable = [(p, z) for p, z in spot if max_price is None or p <= max_price + _EPSILON]
            if affordable:
                under_price += 1
            for spot_price, spot_zone in affordable:
                if not is_blocked(t.name, SPOT, spot_zone):
                    candidates.append((SPOT, spot_zone, spot_price, rate))
                    break
        for market, offer_zone, price, r in candidates:
            key: _Key = (round(price * _PRICE_UNIT), round(r * _RATE_UNIT), t.name, market, offer_zone or "")
            if k not in best or key < best[k][0]:
                launch = Launch(t.name, market, offer_zone, 0, price, r, t.cpu, t.memory_gb, t.gpus, capacity)
                best[k] = (key, launch)

    if best:
        return best
    where = f"in {catalog.region}"
    if fitting == 0:
        largest = max(types, key=lambda t: (t.gpus, t.cpu, t.memory_gb), default=None)
        biggest = (
            f"; the largest has {_worker(largest.cpu, largest.memory_gb, largest.gpus)}"
            if largest is not None
            else "; the catalog has no instance types"
        )
        gpu = " with GPUs" if gpus else ""
        raise AllocationError(
            f"no instance type{gpu} {where} is large enough for one worker of {_worker(cpu, memory_gb, gpus)}{biggest}"
        )
    if not in_market:
        if max_interruption == 0:
            why = "max_interruption=0 means on-demand only, and none of them has an on-demand price"
        else:
            lowest = (
                f"the lowest rate among them is {lowest_rate:g}%"
                if lowest_rate is not None
                else "none has a known rate and spot price"
            )
            why = (
                "none has an on-demand price and spot needs an interruption rate of at most "
                f"{max_interruption:g}% ({lowest})"
            )
        raise AllocationError(
            f"nothing under the interruption limit {where}: {fitting} instance types fit a worker, but {why}"
        )
    if under_price == 0:
        cheapest, name = min(in_market)
        raise AllocationError(
            f"every offer {where} that fits a worker is above max_price=${max_price:g}/hr "
            f"(the cheapest is {name} at ${cheapest:.4f}/hr)"
        )
    named = ", ".join(f"{n}/{m}/{z or 'every zone'}" for n, m, z in sorted(blocked_set, key=str)[:8])
    raise AllocationError(
        f"every offer {where} that fits a worker within the limits is blocked after failures "
        f"({len(blocked_set)} blocked: {named})"
    )


def _cover(left: int, offers: dict[int, tuple[_Key, Launch]]) -> list[Launch]:
    """The cheapest multiset of offers holding ``left`` workers: DP over worker counts."""
    # An offer is dominated by one holding more workers at no greater (price, rate): drop it.
    items: list[tuple[int, int, int, Launch]] = []
    best_above: tuple[int, int] | None = None
    for k in sorted(offers, reverse=True):
        key, launch = offers[k]
        if best_above is None or (key[0], key[1]) < best_above:
            items.append((k, key[0], key[1], launch))
            best_above = (key[0], key[1])
    # cost[n]: (price, rate, instances) of the best covering of n workers; choice[n]: its first item.
    cost: list[tuple[int, int, int]] = [(0, 0, 0)] * (left + 1)
    choice = [-1] * (left + 1)
    for n in range(1, left + 1):
        best: tuple[int, int, int] | None = None
        pick = -1
        for i, (k, price, rate, _) in enumerate(items):
            p, r, c = cost[n - k] if n > k else (0, 0, 0)
            candidate = (p + price, r + rate, c + 1)
            if best is None or candidate < best:
                best, pick = candidate, i
        assert best is not None
        cost[n], choice[n] = best, pick
    chosen: list[Launch] = []
    n = left
    while n > 0:
        k, _, _, launch = items[choice[n]]
        chosen.append(
            Launch(
                launch.instance_type,
                launch.market,
                launch.zone,
                min(k, n),
                launch.price_per_hour,
                launch.interruption,
                launch.cpu,
                launch.memory_gb,
                launch.gpus,
                launch.capacity,
            )
        )
        n -= k
    chosen.sort(key=lambda item: (-item.workers, item.instance_type, item.market, item.zone or ""))
    return chosen


def plan(
    catalog: Catalog,
    workers: int,
    cpu: float,
    memory_gb: float,
    max_interruption: float,
    gpus: int = 0,
    max_price: float | None = None,
    running: Iterable[RunningInstance] = (),
    blocked: Iterable[tuple[str, str, str | None]] = (),
) -> Plan:
    """The cheapest way to give ``workers`` workers what each asks for.

    Args:
        catalog: the region's instance types, prices and interruption rates.
        workers: how many workers.
        cpu: vCPUs each worker needs.
        memory_gb: GiB of memory each worker needs.
        max_interruption: the highest spot interruption rate (percent) to accept;
            ``0`` buys on demand only.
        gpus: GPUs each worker needs; GPU work goes only to GPU types.
        max_price: the most to pay for one instance, in $/hour.
        running: instances runmap already runs, with their free room; used first, best-fit.
        blocked: ``(type, market, zone)`` offers not to use (after a capacity error);
            a zone of None blocks the type in that market in every zone.

    Returns:
        The :class:`Plan`: what to reuse, what to launch, at what price.

    Raises:
        AllocationError: no instance type is large enough, every fitting offer is above
            ``max_price``, nothing is within ``max_interruption``, or all is blocked.

    Example:
        >>> from runmap.cluster.ec2 import Catalog, InstanceType, plan
        >>> catalog = Catalog("us-east-2", [InstanceType("m5.xlarge", cpu=4, memory_gb=16)],
        ...                   on_demand={"m5.xlarge": 0.192})
        >>> print(plan(catalog, workers=2, cpu=2, memory_gb=8, max_interruption=0))
        Will launch 1 new EC2 instances (total $0.1920/hr) for 2 workers:
            us-east-2 (any zone): m5.xlarge (4 CPU/16.0 GB), on-demand ($0.1920/hr), will run 2 job/worker
    """
    check_request(workers, cpu, memory_gb, max_interruption, gpus, max_price)
    reuse = _reuse(running, workers, cpu, memory_gb, gpus)
    left = workers - sum(n for _, n in reuse)
    launch: list[Launch] = []
    if left:
        offers = _offers(catalog, left, cpu, memory_gb, max_interruption, gpus, max_price, blocked)
        launch = _cover(left, offers)
    return Plan(workers=workers, reuse=reuse, launch=launch, region=catalog.region)
