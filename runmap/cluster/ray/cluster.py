"""RayCluster: places env replicas as Ray actors, by compute, with a runtime_env."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runmap.cluster.base import Cluster, new_token
from runmap.cluster.ray.actor import LostBeforeStart, servlet_actor_class, summarize, translate_errors
from runmap.cluster.ray.servlet import RayActorProcess, kill_actor
from runmap.envs.env import Env
from runmap.exceptions import AllocationError, ClusterError, ConfigError
from runmap.server.app import DEFAULT_MAX_BODY
from runmap.servlet import Servlet
from runmap.transport.endpoint import Endpoint

START_TIMEOUT = 600.0  # installing a runtime_env's requirements can take minutes
ALLOCATION_TIMEOUT = 60.0  # how long to wait for a node that fits before giving up
START_ATTEMPTS = 3  # placements of one replica whose node dies under it while it starts
POLL_SECONDS = 0.2

_INSTALLING_KEYS = {"pip", "uv", "conda", "working_dir", "py_modules", "container", "image_uri"}
_RESERVED = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}

# One Ray connection per process: the clusters sharing it, and whether runmap started it.
_ray_lock = threading.Lock()
_ray_users: set[int] = set()
_ray_started_by_runmap = False


class RayCluster(Cluster):
    """Replicas as Ray actors, placed by Ray on the nodes of a Ray cluster.

    Args:
        address: ``None`` uses this process's Ray if it is connected, and starts
            a local Ray otherwise; ``"auto"``, ``"<ip>:<port>"`` or
            ``"ray://<host>:<port>"`` joins an existing cluster.
        name: the cluster's name, shown in replica descriptions.
        num_cpus: logical CPUs of a local Ray that runmap starts (Ray's default
            is every core).
        runtime_env: Ray ``runtime_env`` entries given to every replica, merged
            under each env's own (``py_modules``, ``conda``, ``env_vars``...).
        spread: spread replicas over nodes (Ray's ``SPREAD`` strategy) rather
            than packing them onto the first that fits.
        start_timeout: seconds a replica may take to start, installing its
            requirements included.
        allocation_timeout: seconds to wait for room for a replica's ``compute``
            before :class:`AllocationError`: for a node that could ever hold it
            and, for a replica with nothing to install, for one free enough.
        max_body: the largest request body a servlet accepts, in bytes.
        stream_logs: print what replicas print on this client's stdout, each line
            prefixed with the replica's name (from nodes of this machine).
        init_options: further keyword arguments for ``ray.init``.

    Example:
        >>> import runmap as rm
        >>> with rm.cluster("ray", num_cpus=2) as ray_cluster:  # doctest: +SKIP
        ...     env = rm.env(name="work", compute={"CPU": 1})
        ...     double = rm.function(lambda x: 2 * x).to(ray_cluster, env=env)
        ...     rm.mapper(double, num_replicas=2).map(range(4))
        [0, 2, 4, 6]
    """

    kind = "ray"

    def __init__(
        self,
        address: str | None = None,
        name: str = "ray",
        *,
        num_cpus: int | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        spread: bool = True,
        start_timeout: float = START_TIMEOUT,
        allocation_timeout: float = ALLOCATION_TIMEOUT,
        max_body: int = DEFAULT_MAX_BODY,
        stream_logs: bool = True,
        init_options: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise ConfigError("the Ray cluster needs Ray: pip install 'runmap[ray]'") from exc
        if start_timeout <= 0 or allocation_timeout <= 0:
            raise ConfigError("start_timeout and allocation_timeout must be > 0")
        super().__init__(name, stream_logs)
        self.address = address
        self.runtime_env = dict(runtime_env or {})
        self.spread = spread
        self.start_timeout = start_timeout
        self.allocation_timeout = allocation_timeout
        self.max_body = max_body
        self._actors: list[Any] = []
        self._uploads: dict[str, dict[str, Any]] = {}
        self._released = False
        try:
            self.started_ray = _connect(self, address, num_cpus, dict(init_options or {}))
        except BaseException:
            self._closed = True
            raise

    def from_inside(self) -> Callable[[], Cluster]:
        """The same Ray cluster, joined from one of its actors (which is connected already)."""
        return functools.partial(
            RayCluster,
            "auto",
            f"{self.name}-inside",
            runtime_env=self.runtime_env,
            spread=self.spread,
            start_timeout=self.start_timeout,
            allocation_timeout=self.allocation_timeout,
            max_body=self.max_body,
            stream_logs=self.stream_logs,
        )

    # ------------------------------------------------------------ launching

    def actor_options(self, env: Env) -> dict[str, Any]:
        """The Ray actor options of one replica of ``env``."""
        # Threaded (max_concurrency), so a ping is answered while another actor method
        # runs; never restarted by Ray: a restarted actor would be an empty servlet.
        options: dict[str, Any] = {"num_cpus": 0, "resources": {}, "max_concurrency": 4, "max_restarts": 0}
        for key, amount in env.compute.items():
            if key in _RESERVED:
                options[_RESERVED[key]] = amount
            else:
                options["resources"][key] = amount
        if not options["resources"]:
            del options["resources"]
        runtime_env = self.runtime_env_for(env)
        if runtime_env:
            options["runtime_env"] = runtime_env
        if self.spread:
            options["scheduling_strategy"] = "SPREAD"
        options["name"] = f"runmap:{self.name}:{env.name}:{uuid.uuid4().hex[:8]}"
        return options

    def runtime_env_for(self, env: Env) -> dict[str, Any]:
        """The ``runtime_env`` of a replica of ``env``: the cluster's, then the env's."""
        runtime_env = dict(self.runtime_env)
        if env.reqs:
            single = env.reqs[0] if len(env.reqs) == 1 else ""
            # A requirements file is read by Ray on this client; a list is installed as is.
            runtime_env["pip"] = os.path.abspath(single) if single and os.path.isfile(single) else list(env.reqs)
        if env.env_vars:
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env.env_vars}
        working_dir = env.checked_working_dir()
        if working_dir is not None:
            runtime_env["working_dir"] = working_dir
        if env.git is not None:
            from runmap.envs.git import checkout, code_dir

            repo = checkout(env.git)  # fetched on this client once per commit; Ray uploads it
            code = code_dir(env.git)
            if "working_dir" not in runtime_env:
                runtime_env["working_dir"] = str(code)  # Ray puts it on the actor's sys.path
            else:  # its packages, one by one (py_modules takes package directories)
                packages = [str(p) for p in sorted(code.iterdir()) if (p / "__init__.py").is_file()]
                runtime_env["py_modules"] = [*runtime_env.get("py_modules", []), *packages]
            if env.git.reqs_file:
                from runmap.envs.git import requirement_lines

                pip = runtime_env.get("pip") or []
                if isinstance(pip, str):  # a requirements file already: read it too
                    pip = requirement_lines(Path(pip))
                runtime_env["pip"] = [*pip, *requirement_lines(repo / env.git.reqs_file)]
            if env.git.conda_file:  # Ray's own conda support builds it
                conda_file = repo / env.git.conda_file
                pip = runtime_env.pop("pip", None)
                if pip:  # Ray takes pip or conda, not both: the requirements join the file's own pip list
                    from runmap.envs.conda import with_pip
                    from runmap.envs.git import requirement_lines

                    pip = requirement_lines(Path(pip)) if isinstance(pip, str) else pip
                    runtime_env["conda"] = with_pip(conda_file.read_text(), pip)
                else:
                    runtime_env["conda"] = str(conda_file)
        return runtime_env

    def _launch(self, env: Env) -> Servlet:
        options = self.actor_options(env)
        if "runtime_env" in options:
            with translate_errors(f"the files of replica {env.name!r} could not be uploaded to Ray", died=ClusterError):
                options["runtime_env"] = self._uploaded(options["runtime_env"])
        client_path = [os.path.abspath(p) for p in sys.path if p]
        token = new_token()
        attempt = 1
        while True:
            with translate_errors(f"replica {env.name!r} could not be created on Ray", died=ClusterError):
                actor_class = servlet_actor_class().options(**options)
                actor = actor_class.remote(env.name, token, client_path, self.max_body, self.name)
            with self._lock:
                self._actors.append(actor)
            try:
                with translate_errors(f"replica {env.name!r} did not start on Ray", died=ClusterError):
                    host, port, pid, node_id, log = self._wait_started(env, actor)
            except LostBeforeStart as lost:
                # Placed on a node that died before Ray knew it (a replacement for a
                # replica lost with that node, typically): place it again.
                self._forget_actor(actor)
                self._check_open()  # killed by close(), not lost
                if attempt >= START_ATTEMPTS:
                    raise ClusterError(
                        f"replica {env.name!r} was lost {attempt} times while starting on Ray; last: {lost}"
                    ) from lost.__cause__
                attempt += 1
                continue
            except BaseException:
                self._forget_actor(actor)
                raise
            log_path = Path(log)
            process = RayActorProcess(env.name, actor, host, port, pid, node_id, log_path)
            if log_path.exists():  # a node of this machine: its log can be followed, its pid signalled
                process.log_offset = log_path.stat().st_size
                process.local_pid = pid
            else:
                process.log = None
            return Servlet(env, self, Endpoint(env.name, (host, port), token, keepalive=True), process)

    def _uploaded(self, runtime_env: dict[str, Any]) -> dict[str, Any]:
        """``runtime_env`` with its local ``working_dir`` and ``py_modules`` uploaded to Ray.

        Ray takes local directories only in ``ray.init``'s job-wide runtime_env;
        an actor's must name packages already in the cluster. So runmap uploads
        them the way ``ray.init`` does, once per directory for this cluster: every
        replica of a map runs the same files.
        """
        local: dict[str, Any] = {
            key: runtime_env[key]
            for key in ("working_dir", "py_modules")
            if key in runtime_env and not _is_uri_only(runtime_env[key])
        }
        if not local:
            return runtime_env
        cache_key = repr(sorted(local.items()))
        with self._lock:
            cached = self._uploads.get(cache_key)
        if cached is None:
            cached = _upload(dict(local))
            with self._lock:
                self._uploads[cache_key] = cached
        return {**runtime_env, **cached}

    def _wait_started(self, env: Env, actor: Any) -> tuple[str, int, int, str, str]:
        """Waits for the actor's servlet, bounded by the allocation and start timeouts."""
        import ray
        import ray.exceptions as rex

        ref = actor.address.remote()
        installs = bool(set(self.runtime_env_for(env)) & _INSTALLING_KEYS)
        started = time.monotonic()
        if not self._may_add_nodes():
            # No node will ever join to hold it: waiting allocation_timeout would only delay the answer.
            nodes = _alive_nodes()
            if not any(_fits(env.compute, node["Resources"]) for node in nodes):
                raise AllocationError(
                    f"no node of Ray cluster {self.name!r} can hold a replica of {env.name!r} with compute "
                    f"{_describe_resources(env.compute)}, and it has no autoscaler to add one; nodes have: "
                    + "; ".join(_describe_resources(n["Resources"]) for n in nodes)
                )
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_SECONDS)
            if ready:
                try:
                    return ray.get(ref)  # type: ignore[no-any-return]
                except rex.RayActorError as exc:
                    if exc.actor_init_failed:
                        raise  # the servlet itself could not start: trying again would not help
                    raise LostBeforeStart(summarize(str(exc))) from exc
            waited = time.monotonic() - started
            if self._closed:
                raise ClusterError(f"cluster {self.name!r} was closed while {env.name!r} was starting")
            if waited > self.allocation_timeout:
                nodes = _alive_nodes()
                if not any(_fits(env.compute, node["Resources"]) for node in nodes):
                    raise AllocationError(
                        f"no node of Ray cluster {self.name!r} can hold a replica of {env.name!r} with "
                        f"compute {_describe_resources(env.compute)} (waited {waited:.0f} s); nodes have: "
                        + "; ".join(_describe_resources(n["Resources"]) for n in nodes)
                    )
                # With nothing to install, a replica still pending this long waits for
                # resources; with requirements, it may be installing them (and holds its
                # resources meanwhile), so only start_timeout bounds it.
                free = ray.available_resources()
                if not installs and not _fits(env.compute, free):
                    raise AllocationError(
                        f"every node of Ray cluster {self.name!r} that could hold a replica of {env.name!r} "
                        f"with compute {_describe_resources(env.compute)} stayed busy for {waited:.0f} s; free now: "
                        f"{_describe_resources(free)}"
                    )
            if waited > self.start_timeout:
                free = ray.available_resources()
                if not _fits(env.compute, free):
                    raise AllocationError(
                        f"replica {env.name!r} with compute {_describe_resources(env.compute)} found no free "
                        f"resources in {waited:.0f} s; free now: {_describe_resources(free)}"
                    )
                raise ClusterError(f"replica {env.name!r} did not start within {self.start_timeout:g} s")

    def _may_add_nodes(self) -> bool:
        """Whether an autoscaler may add nodes to the Ray cluster (True when that is unknown)."""
        return not self.started_ray and _has_autoscaler()  # asked each time: the status may come late

    def _forget_actor(self, actor: Any) -> None:
        kill_actor(actor)
        with self._lock:
            if actor in self._actors:
                self._actors.remove(actor)

    # ------------------------------------------------------------- stopping

    def stop_servlet(self, servlet: Servlet) -> None:
        super().stop_servlet(servlet)
        if isinstance(servlet.process, RayActorProcess):
            self._forget_actor(servlet.process.actor)

    def close(self) -> None:
        """Kills every actor this cluster created and, if runmap started Ray, shuts it down."""
        super().close()
        with self._lock:
            if self._released:
                return
            self._released = True
            actors, self._actors = self._actors, []
        for actor in actors:
            kill_actor(actor)
        _disconnect(self)

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes: ``NodeID``, ``NodeManagerAddress``, ``Resources``."""
        return _alive_nodes()


# ------------------------------------------------------ the Ray connection


def _connect(cluster: RayCluster, address: str | None, num_cpus: int | None, init_options: dict[str, Any]) -> bool:
    """Connects this process to Ray, or shares its connection; True if runmap started Ray."""
    global _ray_started_by_runmap
    import ray

    with _ray_lock:
        if ray.is_initialized():
            _ray_users.add(id(cluster))
            return _ray_started_by_runmap
        if address is None and num_cpus is not None:
            init_options.setdefault("num_cpus", num_cpus)
        init_options.setdefault("log_to_driver", True)
        with translate_errors(f"could not {'start' if address is None else 'join'} Ray for cluster {cluster.name!r}"):
            # "local": a Ray of this process's own, even if RAY_ADDRESS or a `ray start`
            # on this machine would make a bare ray.init() join another.
            ray.init(address=address or "local", **init_options)
        _ray_users.add(id(cluster))
        _ray_started_by_runmap = address is None
        return _ray_started_by_runmap


def _disconnect(cluster: RayCluster) -> None:
    """Shuts Ray down once the last cluster using a Ray runmap started is closed."""
    global _ray_started_by_runmap
    import ray

    with _ray_lock:
        _ray_users.discard(id(cluster))
        if _ray_users or not _ray_started_by_runmap:
            return
        _ray_started_by_runmap = False
        if ray.is_initialized():
            ray.shutdown()


def _is_uri_only(value: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(isinstance(v, str) and "://" in v for v in values)


def _upload(local: dict[str, Any]) -> dict[str, Any]:
    """Uploads local directories the way ``ray.init`` does for a job; returns their URIs.

    This leans on Ray's own (private) upload helpers, the only way to give one
    actor files of its own; their signatures changed across Ray versions.
    """
    import inspect
    import tempfile

    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    with tempfile.TemporaryDirectory(prefix="runmap-upload-") as scratch:
        for upload in (upload_py_modules_if_needed, upload_working_dir_if_needed):
            kwargs: dict[str, Any] = {"scratch_dir": scratch}
            if "include_gitignore" in inspect.signature(upload).parameters:
                kwargs["include_gitignore"] = True
            local = upload(local, **kwargs)
    local.pop("excludes", None)
    return local


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    with translate_errors("could not list Ray's nodes"):
        return [node for node in ray.nodes() if node.get("Alive")]


def _fits(compute: Mapping[str, float], resources: Mapping[str, float]) -> bool:
    return all(amount <= resources.get(key, 0) for key, amount in compute.items() if amount > 0)


def _has_autoscaler() -> bool:
    """Whether the Ray cluster has an autoscaler that may add nodes; True when that is unknown.

    A Ray head started without an autoscaling config (``ray start --head``, a
    test cluster) still runs Ray's monitor, with its "readonly" node provider:
    the node types it reports are then ``node_<node id>``. That status is what
    ``ray status`` reads; Ray has no public API for it. Autoscaler v2 (KubeRay)
    does not publish it, and is taken to autoscale.
    """
    import json

    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        mapping = json.loads(status)["autoscaler_report"]["node_type_mapping"] if status else None
    except Exception:
        return True
    if not isinstance(mapping, dict) or not mapping:
        return True
    return any(kind != f"node_{key}" for key, kind in mapping.items())


def _describe_resources(resources: Mapping[str, float]) -> str:
    """``CPU=2, GPU=1, memory=17.4 GB``: Ray's resources, bytes shown in GB."""
    shown = {k: v for k, v in resources.items() if not k.startswith("node:") and k != "object_store_memory"}
    return ", ".join(f"{k}={_amount(k, v)}" for k, v in sorted(shown.items())) or "nothing"


def _amount(key: str, value: float) -> str:
    if key != "memory":
        return f"{value:g}"
    return f"{value / 1e9:.1f} GB" if value >= 1e8 else f"{value / 1e6:.0f} MB"
