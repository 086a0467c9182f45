"""The tables the EC2 planner reads: instance shapes, prices and interruption rates.

A :class:`Catalog` is plain data: what a region offers (instance types), what
each costs (on-demand per type, spot per type and availability zone) and how
often AWS takes each type's spot instances back (percent per month, from the
Spot Advisor). The planner (:mod:`runmap.cluster.ec2.planner`) is a pure
function of it, so a catalogue built by hand plans offline exactly as one
fetched from AWS.

The Spot Advisor publishes buckets, not rates; :func:`spot_advisor_rate` turns
a bucket into the rate the planner uses, the bucket's midpoint (and 61 for the
open-ended ">20%" bucket):

    >>> spot_advisor_rate("<5%"), spot_advisor_rate(2), spot_advisor_rate(">20%")
    (2.5, 13.5, 61.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from runmap.exceptions import ConfigError

# Spot Advisor's interruption buckets, by their index in its data ("r": 0..4) and by their label,
# as the rate (percent) the planner uses: each bucket's midpoint; ">20%" counts as 61 (20..100).
SPOT_ADVISOR_MIDPOINTS: dict[str, float] = {
    "<5%": 2.5,
    "5-10%": 8.0,
    "10-15%": 13.5,
    "15-20%": 19.0,
    ">20%": 61.0,
}
_BUCKETS_BY_INDEX = list(SPOT_ADVISOR_MIDPOINTS.values())


def spot_advisor_rate(bucket: int | str) -> float:
    """The interruption rate (percent) the planner uses for a Spot Advisor bucket.

    Args:
        bucket: the bucket's index in Spot Advisor's data (``0`` to ``4``, its ``"r"`` field)
            or its label (``"<5%"``, ``"5-10%"``, ``"10-15%"``, ``"15-20%"``, ``">20%"``).

    Returns:
        The bucket's midpoint: 2.5, 8, 13.5, 19, or 61 for ">20%".
    """
    if isinstance(bucket, bool):
        raise ConfigError(f"not a Spot Advisor bucket: {bucket!r}")
    if isinstance(bucket, int):
        if 0 <= bucket < len(_BUCKETS_BY_INDEX):
            return _BUCKETS_BY_INDEX[bucket]
    elif isinstance(bucket, str):
        label = bucket.replace(" ", "").replace("–", "-")
        if label in SPOT_ADVISOR_MIDPOINTS:
            return SPOT_ADVISOR_MIDPOINTS[label]
    raise ConfigError(
        f"not a Spot Advisor bucket: {bucket!r}; expected 0-4 or one of {', '.join(SPOT_ADVISOR_MIDPOINTS)}"
    )


@dataclass(frozen=True)
class InstanceType:
    """An EC2 instance type's shape.

    Args:
        name: the type's name, such as ``"r5n.2xlarge"``.
        cpu: its vCPUs.
        memory_gb: its memory in GiB, as EC2 states it.
        gpus: its GPUs.
        gpu_memory_gb: memory of each GPU, in GiB.
        arch: ``"x86_64"`` or ``"arm64"``.
    """

    name: str
    cpu: float
    memory_gb: float
    gpus: int = 0
    gpu_memory_gb: float = 0
    arch: str = "x86_64"


@dataclass(frozen=True)
class RunningInstance:
    """An instance runmap already runs, with what is still free on it.

    Args:
        instance_id: its EC2 id (``"i-0abc..."``) or any name to report it by.
        instance_type: its type's name.
        free_cpu: vCPUs not taken by replicas already there.
        free_memory_gb: memory not taken, in GiB.
        free_gpus: GPUs not taken.
    """

    instance_id: str
    instance_type: str
    free_cpu: float
    free_memory_gb: float
    free_gpus: int = 0


@dataclass(frozen=True)
class Catalog:
    """What a region offers and what it costs: the planner's whole input about AWS.

    Args:
        region: the region's name, such as ``"us-east-2"``.
        types: the instance types to consider.
        on_demand: on-demand price in $/hour, by type name. A type missing here is not
            bought on demand.
        spot: the latest spot price in $/hour, by ``(type name, availability zone)``.
            A pair missing here is not bought as spot.
        interruption: the spot interruption rate in percent, by type name (Spot Advisor's
            bucket midpoint, see :func:`spot_advisor_rate`). A type missing here is never
            bought as spot: an unknown rate is not guessed.
        zones: the region's availability zones, for on-demand instances; by default the
            zones named in ``spot``.
    """

    region: str
    types: Iterable[InstanceType]
    on_demand: Mapping[str, float] = field(default_factory=dict)
    spot: Mapping[tuple[str, str], float] = field(default_factory=dict)
    interruption: Mapping[str, float] = field(default_factory=dict)
    zones: Iterable[str] = ()

    def __post_init__(self) -> None:
        types = tuple(self.types)
        names = [t.name for t in types]
        if len(set(names)) != len(names):
            raise ConfigError(f"instance types listed twice in the catalog of {self.region}")
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "zones", tuple(sorted(set(self.zones) or {zone for _, zone in self.spot})))

    def type(self, name: str) -> InstanceType | None:
        """The instance type called ``name``, or None."""
        for t in self.types:
            if t.name == name:
                return t
        return None
