"""EC2Cluster: the cheapest instances for the job, launched with boto3, then used as SSH hosts.

    rm.cluster("ec2", workers=3, cpu=4, memory_gb=32, max_interruption=15)
      plan()  catalogue (given, else fetched) + runmap instances running (their free room, from tags)
              └── planner.plan(): what to reuse, what to launch; no side effects
      up()    Launcher.up(): launch with failover; tag the room this cluster holds on each instance
              └── reach(instance) -> SSHHost, per instance ──► an ssh config file of this cluster
                    └── SSHCluster(aliases, config_file=...)   bootstrap, placement, logs, host loss
      _launch(env)   a replica: placed by the SSH clusters; no room left (more replicas than
                     workers, or an instance lost) -> one more worker planned and launched
      close() / down()   servlets stopped; instances no other cluster uses (close) or all this
                         cluster launched (down) terminated; the cost printed, kept in ``cost``

The instances are one or more :class:`~runmap.cluster.ssh.cluster.SSHCluster`\\ s, one per
launch, behind this cluster: a replica's servlet is theirs, re-labelled as this cluster's,
so that replacements of dead replicas are asked of this cluster (which may launch).

Sharing between clusters is written on the instances: ``runmap:use:<cluster id>`` holds
the room (``cpu/memory_gb/gpus``) a cluster uses there. A cluster that stops using an
instance removes its tag, and the last one to leave terminates it (unless it keeps its
instances). The tags are advisory: two clients planning at the same moment may both count
the same free room.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runmap import registry
from runmap.cluster.base import Cluster
from runmap.cluster.ec2.catalog import Catalog, RunningInstance
from runmap.cluster.ec2.launcher import (
    TAG_MARKET,
    TAG_PRICE,
    TAG_USE,
    UBUNTU_PARAMETER,
    Launcher,
    config_dir,
)
from runmap.cluster.ec2.planner import Plan, check_request, plan
from runmap.cluster.ec2.reach import PublicAddress, Reach, SSHHost, instance_address, ssh_config
from runmap.envs.env import Env
from runmap.exceptions import AllocationError, ConfigError
from runmap.paths import open_private, runtime_subdir
from runmap.servlet import Servlet

GIB = 2**30


@dataclass
class Held:
    """An instance this cluster uses: launched by it, or reused."""

    instance_id: str
    instance_type: str
    market: str
    zone: str
    host: str
    workers: int  # the workers' room this cluster holds there
    price_per_hour: float
    launched: bool
    since: float  # wall-clock time it was taken
    ended: float | None = None  # when this cluster terminated or left it


@dataclass(frozen=True)
class Cost:
    """What a cluster's launched instances cost: instance-hours x price.

    Attributes:
        dollars: the total, in $.
        instance_hours: the hours each launched instance was up for this cluster, summed.
        price_per_hour: the $/hour of the instances launched, while all were up.
        instances: ``(instance id, hours, $/hour)`` for each instance launched.
    """

    dollars: float
    instance_hours: float
    price_per_hour: float
    instances: tuple[tuple[str, float, float], ...]

    def __str__(self) -> str:
        return (
            f"${self.dollars:.6f} ({self.instance_hours:.4f} instance-hours on {len(self.instances)} instances "
            f"launched, ${self.price_per_hour:.4f}/hr)"
        )


class EC2Cluster(Cluster):
    """Workers on the cheapest EC2 instances that hold them, reached as SSH hosts.

    Args:
        workers: how many workers (one replica each, by default).
        cpu: vCPUs per worker.
        memory_gb: GiB of memory per worker.
        max_interruption: the highest spot interruption rate (percent) to accept; ``0``
            buys on demand only.
        gpus: GPUs per worker.
        region: the AWS region (else boto3's configured one).
        max_price: the most to pay for one instance, in $/hour.
        idle_minutes: an instance with no servlet and no SSH session this long stops itself.
        catalog: the price tables to plan from (a :class:`~runmap.cluster.ec2.Catalog`);
            its empty fields are fetched from AWS.
        name: the cluster's name, tagged on its instances.
        reach: how an instance is reached (``describe_instances`` record ->
            :class:`~runmap.cluster.ec2.reach.SSHHost`); by default its public DNS name with
            runmap's key, the host key read from the instance's console.
        host_keys: ``"console"`` (host keys learnt from the console output through the AWS
            API, the default) or ``"accept-new"`` (trusted on first connection).
        user: the login user (default: ``ubuntu`` for Ubuntu images, else ``ec2-user``).
        image_id, image_parameter, ssh_from: as for the launcher
            (:class:`~runmap.cluster.ec2.launcher.Launcher`).
        keep_instances: on :meth:`close`, leave the instances running for the next cluster
            to reuse (they stop themselves after ``idle_minutes``); :meth:`down` ends them.
        session: a ``boto3.Session``.
        out: where to print the plan, failover and the cost (default: stderr).

    Example:
        >>> import runmap as rm
        >>> with rm.cluster("ec2", workers=3, cpu=4, memory_gb=32, max_interruption=15) as c:  # doctest: +SKIP
        ...     print(c.plan())
        ...     rm.run_map(lambda x: x * x, range(100), c)
    """

    kind = "ec2"
    remote_files = True

    def __init__(
        self,
        *,
        workers: int,
        cpu: float,
        memory_gb: float,
        max_interruption: float = 15,
        gpus: int = 0,
        region: str | None = None,
        max_price: float | None = None,
        idle_minutes: int = 10,
        catalog: Catalog | None = None,
        name: str = "ec2",
        reach: Reach | None = None,
        host_keys: str = "console",
        user: str | None = None,
        image_id: str | None = None,
        image_parameter: str = UBUNTU_PARAMETER,
        ssh_from: str | None = None,
        keep_instances: bool = False,
        session: Any = None,
        out: Callable[[str], Any] | None = None,
        stream_logs: bool = True,
        start_timeout: float | None = None,
    ) -> None:
        if host_keys not in ("console", "accept-new"):
            raise ConfigError(f"host_keys must be 'console' or 'accept-new', not {host_keys!r}")
        if catalog is not None and not isinstance(catalog, Catalog):
            raise ConfigError(f"catalog must be a runmap.cluster.ec2.Catalog, not {type(catalog).__name__}")
        self.request: dict[str, Any] = {
            "workers": workers,
            "cpu": cpu,
            "memory_gb": memory_gb,
            "max_interruption": max_interruption,
            "gpus": gpus,
            "max_price": max_price,
        }
        check_request(**self.request)  # a bad request fails here, before AWS is asked anything
        if catalog is not None and region is not None and catalog.region != region:
            raise ConfigError(f"the catalog is of region {catalog.region!r}, the cluster's is {region!r}")
        super().__init__(name, stream_logs)
        self.workers = workers
        self.out = out or (lambda line: print(line, file=sys.stderr))
        self.launcher = Launcher(
            name,
            region or (catalog.region if catalog is not None else None),
            image_id=image_id,
            image_parameter=image_parameter,
            ssh_from=ssh_from,
            idle_minutes=idle_minutes,
            out=self.out,
            session=session,
        )
        self.region = self.launcher.region
        self.id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.keep_instances = keep_instances
        self.host_keys = host_keys
        self.user = user or ("ubuntu" if "canonical" in image_parameter else "ec2-user")
        self._reach = reach
        self._given_catalog = catalog
        self._catalog: Catalog | None = None
        self._start_timeout = start_timeout
        self._held: dict[str, Held] = {}
        self._groups: list[Any] = []  # SSHCluster, one per launch
        self._up_lock = threading.Lock()
        self._plan: Plan | None = None
        self.cost: Cost | None = None
        # The room of one worker, as each replica of an env without a `compute` asks it.
        self.worker_compute = {"CPU": float(cpu), "memory": float(memory_gb) * GIB}
        if gpus:
            self.worker_compute["GPU"] = float(gpus)

    # ------------------------------------------------------------ planning

    def catalog(self) -> Catalog:
        """The catalogue to plan from: the one given, its empty fields fetched from AWS (once)."""
        if self._catalog is None:
            from runmap.cluster.ec2.fetch import complete_catalog

            spot = self.request["max_interruption"] > 0
            self._catalog = complete_catalog(self._given_catalog, self.region, self.launcher.session, spot=spot)
        return self._catalog

    def running(self) -> list[RunningInstance]:
        """runmap's live instances in the region (but this cluster's), with the room no cluster holds."""
        catalog = self.catalog()
        found = []
        for inst in self.launcher.runmap_instances():
            shape = catalog.type(inst["InstanceType"])
            if shape is None or inst["InstanceId"] in self._held:
                continue
            cpu, memory, gpus = shape.cpu, shape.memory_gb, shape.gpus
            for tag in inst.get("Tags", []):
                if tag["Key"].startswith(TAG_USE):
                    used = _room(tag["Value"])
                    cpu, memory, gpus = cpu - used[0], memory - used[1], gpus - int(used[2])
            if cpu > 0 and memory > 0:
                found.append(RunningInstance(inst["InstanceId"], shape.name, cpu, memory, max(0, gpus)))
        return found

    def plan(self, workers: int | None = None) -> Plan:
        """What :meth:`up` would do now, with no side effects: ``print(cluster.plan())`` shows it."""
        request = {**self.request, "workers": workers or self.workers}
        return plan(self.catalog(), running=self.running(), **request)

    # ------------------------------------------------------------ launching

    def up(self) -> Plan:
        """Carries out the plan (once): reuses, launches, reaches the instances as SSH hosts."""
        with self._up_lock:
            self._check_open()
            if self._plan is None:
                self._plan = self._acquire(self.workers)
            return self._plan

    @property
    def is_up(self) -> bool:
        return self._plan is not None

    def _acquire(self, workers: int) -> Plan:
        """Plans ``workers`` more workers, launches them, and adds an SSH cluster over their instances."""
        self._note_ended()
        catalog = self.catalog()
        running = self.running()
        types = {r.instance_id: r.instance_type for r in running}
        request = {**self.request, "workers": workers}
        carried, launched = self.launcher.up(catalog, request, running=running)
        now = time.time()
        new: dict[str, Held] = {}
        try:
            reused = self.launcher.describe([i for i, _ in carried.reuse])
            tags = {d["InstanceId"]: {t["Key"]: t["Value"] for t in d.get("Tags", [])} for d in reused}
            for instance_id, n in carried.reuse:
                t = tags.get(instance_id, {})
                new[instance_id] = Held(
                    instance_id, types[instance_id], t.get(TAG_MARKET, "?"), "", "", n,
                    float(t.get(TAG_PRICE, 0) or 0), launched=False, since=now,
                )  # fmt: skip
            for inst in launched:
                new[inst.instance_id] = Held(
                    inst.instance_id, inst.instance_type, inst.market, inst.zone, inst.host, inst.capacity,
                    inst.price_per_hour, launched=True, since=now,
                )  # fmt: skip
            with self._lock:
                self._held.update(new)
            for held in new.values():
                self.launcher.tag([held.instance_id], TAG_USE + self.id, self._use_value(held.workers))
            described = self.launcher.wait_running(list(new))
            hosts: dict[str, SSHHost] = {}
            for d in described:
                held = new[d["InstanceId"]]
                held.host = instance_address(d) or held.instance_id
                held.zone = held.zone or d.get("Placement", {}).get("AvailabilityZone", "")
                hosts[held.host] = self.reach(d)
            self.out(
                carried.summary(
                    hosts=[new[i.instance_id].host for i in launched],
                    reused_hosts=[new[i].host for i, _ in carried.reuse],
                    launched=True,
                )
            )
            self._groups.append(self._ssh_cluster(hosts, {h.host: h.workers for h in new.values()}))
        except BaseException:
            self._leave(list(new), terminate=[i.instance_id for i in launched])
            raise
        registry.update(self)
        return carried

    def reach(self, instance: Mapping[str, Any]) -> SSHHost:
        """How ``instance`` is logged in to (the ``reach=`` given, else :class:`PublicAddress`)."""
        if self._reach is None:
            self._reach = PublicAddress(
                self.launcher.ec2,
                self.launcher.key_file(),
                config_dir() / "known_hosts",
                user=self.user,
                host_keys=self.host_keys,
            )
        return self._reach(instance)

    def _ssh_cluster(self, hosts: Mapping[str, SSHHost], workers: Mapping[str, int]) -> Any:
        from runmap.cluster.ssh.cluster import START_TIMEOUT, SSHCluster

        directory = runtime_subdir("ec2", self.id)
        config = directory / f"ssh_config-{len(self._groups)}"
        fd = open_private(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write(ssh_config(hosts))
        group = SSHCluster(
            list(hosts),
            self.name,
            config_file=config,
            accept_new_host_keys=self.host_keys == "accept-new",
            resources={host: {k: v * workers[host] for k, v in self.worker_compute.items()} for host in hosts},
            default_compute=self.worker_compute,  # a replica that asks for nothing takes one worker's room
            stream_logs=False,  # this cluster follows its servlets' logs
            start_timeout=self._start_timeout or START_TIMEOUT,
        )
        return group

    def _use_value(self, workers: int) -> str:
        r = self.request
        return f"{workers * r['cpu']:g}/{workers * r['memory_gb']:g}/{workers * r['gpus']}"

    def _launch(self, env: Env) -> Servlet:
        self.up()
        inner = self._place(env)
        if inner is None:
            with self._up_lock:
                inner = self._place(env)  # another thread may have made room meanwhile
                if inner is None:
                    self.out(f"{self.name}: no room left for replica {env.name!r}; launching one more worker")
                    self._acquire(1)
                    inner = self._groups[-1]._launch(env)
        return Servlet(inner.env, self, inner.endpoint, inner.process)

    def from_inside(self) -> Callable[[], Cluster]:
        """The instances this cluster holds, reached as SSH hosts from the one a servlet runs on.

        A Mapper placed on an EC2 cluster (:meth:`runmap.Mapper.to`) starts its replicas
        on the instances held when it is placed, as an SSH cluster of them, with the
        key and host keys this client logs in with (runmap/cluster/ssh/access.py). It
        launches nothing: AWS credentials stay on the client. A replica that dies is
        replaced on the room left on those instances.
        """
        from runmap.cluster.ssh.access import FromInside, gather

        self.up()
        with self._up_lock:
            groups = list(self._groups)
        hosts = [access for g in groups for access in gather(g.hosts, g.config_file, g.key)]
        resources = {host: room for g in groups for host, room in (g.resources or {}).items()}
        first = groups[0]
        options = {"resources": resources, "default_compute": self.worker_compute, "max_body": first.max_body,
                   "start_timeout": first.start_timeout}
        return FromInside(tuple(hosts), f"{self.name}-inside", options)

    def _place(self, env: Env) -> Servlet | None:
        for group in list(self._groups):
            try:
                servlet: Servlet = group._launch(env)
                return servlet
            except AllocationError:
                continue
        return None

    # ------------------------------------------------------------ stopping

    def _note_ended(self) -> None:
        """Marks the held instances EC2 no longer runs (interrupted, stopped idle) as ended."""
        with self._lock:
            live = [h.instance_id for h in self._held.values() if h.ended is None]
        if not live:
            return
        states = {d["InstanceId"]: d["State"]["Name"] for d in self.launcher.describe(live)}
        now = time.time()
        with self._lock:
            for instance_id in live:
                if states.get(instance_id) not in ("pending", "running"):
                    self._held[instance_id].ended = now

    def _leave(self, instance_ids: Sequence[str], terminate: Sequence[str] = ()) -> None:
        """Stops using ``instance_ids``; terminates ``terminate``, and those no other cluster uses
        (unless instances are kept)."""
        if not instance_ids:
            return
        self.launcher.tag(list(instance_ids), TAG_USE + self.id, None)
        ending = set(terminate)
        if not self.keep_instances:
            for d in self.launcher.describe(list(instance_ids)):
                if d["State"]["Name"] in ("pending", "running") and not any(
                    t["Key"].startswith(TAG_USE) for t in d.get("Tags", [])
                ):
                    ending.add(d["InstanceId"])
        if ending:
            self.launcher.down(sorted(ending))
        now = time.time()
        with self._lock:
            for instance_id in instance_ids:
                held = self._held.get(instance_id)
                if held is not None and held.ended is None:
                    held.ended = now

    def close(self) -> None:
        """Stops the servlets and leaves the instances: those no other cluster uses are terminated
        (unless ``keep_instances``). Prints what the launched instances cost; see :attr:`cost`."""
        self._finish(terminate_launched=False)

    def down(self) -> None:
        """Closes the cluster and terminates every instance it launched, even one others use."""
        self._finish(terminate_launched=True)

    def _finish(self, terminate_launched: bool) -> None:
        with self._lock:
            first = not self._closed
        if first:
            super().close()
            for group in self._groups:
                group.close()
        with self._lock:
            live = [h.instance_id for h in self._held.values() if h.ended is None]
            launched = [h.instance_id for h in self._held.values() if h.launched and h.ended is None]
        self._note_ended()
        self._leave(live, terminate=launched if terminate_launched else ())
        if terminate_launched:
            left = [i for i in launched if i not in live]  # kept on close, terminated now
            if left:
                self.launcher.down(left)
        if first or terminate_launched:
            self._report()
        kept = [h.host for h in self._held.values() if h.launched and self.keep_instances and not terminate_launched]
        if kept and first:
            self.out(
                f"{self.name}: left running for reuse: {', '.join(kept)}; they stop themselves after "
                f"{self.launcher.idle_minutes} idle minutes (cluster.down() ends them now)"
            )

    def _report(self) -> None:
        now = time.time()
        with self._lock:
            launched = [h for h in self._held.values() if h.launched]
        rows = tuple((h.instance_id, ((h.ended or now) - h.since) / 3600, h.price_per_hour) for h in launched)
        self.cost = Cost(
            dollars=round(sum(hours * price for _, hours, price in rows), 9),
            instance_hours=sum(hours for _, hours, _ in rows),
            price_per_hour=round(sum(price for _, _, price in rows), 6),
            instances=rows,
        )
        if rows:
            self.out(f"{self.name}: cost {self.cost}")

    # ------------------------------------------------------------ describing

    def registry_details(self) -> dict[str, Any]:
        """What ``runmap status`` shows of it and ``runmap down`` terminates."""
        with self._lock:
            held = [dataclasses.asdict(h) for h in self._held.values() if h.ended is None]
        return {"region": self.region, "cluster_id": self.id, "instances": held}

    @property
    def held(self) -> list[Held]:
        """The instances this cluster uses or used, launched or reused."""
        with self._lock:
            return list(self._held.values())

    @property
    def hosts(self) -> list[str]:
        return [host for group in self._groups for host in group.hosts]


def _room(value: str) -> tuple[float, float, float]:
    """``"8/64/0"`` -> ``(8.0, 64.0, 0.0)``: the room a ``runmap:use:`` tag holds (bad tags hold none)."""
    try:
        cpu, memory, gpus = (float(v) for v in value.split("/"))
    except ValueError:
        return (0.0, 0.0, 0.0)
    return cpu, memory, gpus
