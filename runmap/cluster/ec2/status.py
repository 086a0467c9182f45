"""EC2 clusters in ``runmap status`` and ``runmap down``: their instances, $/hour, time up; ending them.

The registry entry of an EC2 cluster carries its instances (:meth:`EC2Cluster.registry_details`),
so the command lists them without asking AWS, and terminates the ones the cluster launched
with boto3 directly, whatever state its client is in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any


def status_lines(name: str, details: Mapping[str, Any], uptime: Callable[[float], str]) -> list[str]:
    """What ``runmap status`` prints of one EC2 cluster."""
    instances = details.get("instances") or []
    now = time.time()
    price = sum(float(i["price_per_hour"]) for i in instances if i.get("launched"))
    lines = [f"EC2 cluster {name} ({details.get('region', '?')}): {len(instances)} instances, ${price:.4f}/hr launched"]
    rows = [("INSTANCE", "TYPE", "MARKET", "ZONE", "$/HR", "UP", "HOST", "")]
    for i in instances:
        rows.append(
            (
                str(i["instance_id"]),
                str(i["instance_type"]),
                str(i["market"]),
                str(i["zone"] or "-"),
                f"{float(i['price_per_hour']):.4f}",
                uptime(now - float(i["since"])),
                str(i["host"] or "-"),
                "launched" if i.get("launched") else "reused",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return lines


def terminate(details: Mapping[str, Any]) -> list[str]:
    """Terminates the instances an EC2 cluster launched (from its registry entry); returns their ids."""
    ids = sorted(str(i["instance_id"]) for i in details.get("instances") or [] if i.get("launched"))
    if ids:
        import boto3

        boto3.session.Session(region_name=details.get("region")).client("ec2").terminate_instances(InstanceIds=ids)
    return ids
