"""EC2 clusters: the cheapest instances for the job, planned from price tables.

The planner is public and pure (no AWS calls), so plans can be made offline:

    >>> from runmap.cluster.ec2 import Catalog, InstanceType, RunningInstance, plan

Nothing here imports boto3; the launcher (:mod:`runmap.cluster.ec2.launcher`) does, when used.
"""

from __future__ import annotations

from runmap.cluster.ec2.catalog import (
    SPOT_ADVISOR_MIDPOINTS,
    Catalog,
    InstanceType,
    RunningInstance,
    spot_advisor_rate,
)
from runmap.cluster.ec2.planner import Launch, Plan, plan

__all__ = [
    "SPOT_ADVISOR_MIDPOINTS",
    "Catalog",
    "InstanceType",
    "Launch",
    "Plan",
    "RunningInstance",
    "plan",
    "spot_advisor_rate",
]
