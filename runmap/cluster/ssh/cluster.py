"""SSHCluster: servlets on hosts reached with OpenSSH, one multiplexed connection per host.

    client ── SSHConnection per host (ControlMaster: host keys verified, ~/.ssh/config honoured)
      │            │ bootstrap once per env: the host's python3 + runmap + the env's reqs, cached by hash
      │            ▼
      ├── ssh -S <master> host 'python -P -m runmap.server'   (one session per replica; stdin carries
      │        the config and the token, its end is the servlet's signal to leave; stderr -> local log)
      │            │ ready line: {"unix": <host's runtime dir>/servlets/<random>.sock, "pid": ...}
      │            ▼
      └── Unix socket <runtime dir>/ssh/<cluster>/<replica>.sock ── forwarded by the master ──► the host's socket

A replica is the local ``ssh`` session that runs its servlet, so every part of
the seam is the local cluster's: the start-up protocol, the pidfd that tells
at once that the session ended (and :func:`runmap.cluster.ssh.connection.classify_exit`
says whether the servlet exited, was killed, or the host was lost), the log
file the client streams, and the pid ``runmap down`` signals. On the host, the
servlet listens on a socket file in its user's private runtime directory only
(no port, which another user of the host could bind once the servlet ended and
so receive a client's requests); only sshd is exposed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runmap import _threads
from runmap.cluster.base import Cluster, new_token
from runmap.cluster.process import ExitStatus, SubprocessServlet, start_subprocess_servlet, tail
from runmap.cluster.ssh.bootstrap import HostInfo, bootstrap, ship_directory
from runmap.cluster.ssh.connection import SSHConnection
from runmap.cluster.ssh.placement import Placement
from runmap.envs.env import Env
from runmap.exceptions import ClusterError, ConfigError
from runmap.paths import log_dir, private_dir, runtime_subdir
from runmap.server.app import DEFAULT_MAX_BODY
from runmap.server.command import servlet_command
from runmap.server.logfile import MAX_LOG_BYTES
from runmap.servlet import Servlet
from runmap.transport.endpoint import Endpoint

START_TIMEOUT = 120.0


class SSHCluster(Cluster):
    """Replicas on SSH hosts, packed onto them by each env's ``compute``.

    Args:
        hosts: host names as ``ssh`` takes them: aliases of ``~/.ssh/config``
            (with their ``User``, ``Port``, ``IdentityFile``, ``ProxyJump``),
            ``user@host`` or ``user@host:port``.
        name: the cluster's name.
        key: a private key file to log in with (else the ssh config's or agent's).
        config_file: an OpenSSH client config to use instead of ``~/.ssh/config``.
        accept_new_host_keys: trust a host seen for the first time and record its
            key (``StrictHostKeyChecking=accept-new``). By default an unknown host
            key is refused, with a message that says how to accept it.
        resources: what each host offers, by host name (``{"host-a": {"CPU": 8}}``),
            in place of what it reports.
        default_compute: what a replica whose env names no ``compute`` takes (default ``{"CPU": 1}``).
        max_body: the largest request body a servlet accepts, in bytes.
        stream_logs: print what replicas print on this client's stdout, prefixed.
        log_max_bytes: the cap on one replica's log file on this client (what its servlet and
            session print), past which it is renamed ``<replica>.log.1``, as on the local
            cluster. None: 64 MiB.

    Example:
        >>> import runmap as rm
        >>> with rm.cluster("ssh", hosts=["host-a", "host-b"]) as hosts:  # doctest: +SKIP
        ...     env = rm.env(name="work", compute={"CPU": 1})
        ...     rm.mapper(lambda n: n ** n, cluster=hosts, env=env, num_replicas=4).map(range(8))
    """

    kind = "ssh"
    remote_files = True

    def __init__(
        self,
        hosts: Sequence[str],
        name: str = "ssh",
        *,
        key: str | os.PathLike[str] | None = None,
        config_file: str | os.PathLike[str] | None = None,
        accept_new_host_keys: bool = False,
        resources: dict[str, dict[str, float]] | None = None,
        default_compute: dict[str, float] | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        stream_logs: bool = True,
        start_timeout: float = START_TIMEOUT,
        log_max_bytes: int | None = None,
    ) -> None:
        if isinstance(hosts, str) or not hosts:
            raise ConfigError("hosts must be a non-empty list of host names, such as ['host-a', 'user@10.0.0.5:2222']")
        if len(set(hosts)) != len(hosts):
            raise ConfigError(f"hosts are listed twice: {list(hosts)}")
        super().__init__(name, stream_logs)
        self.hosts = list(hosts)
        self.max_body = max_body
        self.start_timeout = start_timeout
        if log_max_bytes is not None and log_max_bytes < 1:
            raise ConfigError(f"log_max_bytes must be a positive number of bytes, not {log_max_bytes!r}")
        self.log_max_bytes = log_max_bytes
        self.config_file = os.fspath(config_file) if config_file else None
        self.key = os.fspath(key) if key else None
        self.resources = resources
        self.default_compute = default_compute
        self._closers: list[Callable[[], None]] = []
        self._sockets = _socket_dir(uuid.uuid4().hex[:8])  # one per cluster: two of one name never collide
        self._connections: dict[str, SSHConnection] = {}
        self._infos: dict[tuple[str, str], HostInfo] = {}
        self._bootstrap_locks: dict[tuple[str, str], threading.Lock] = {}
        self._placed: dict[str, str] = {}  # servlet name -> host
        self._shipped: dict[tuple[str, str], str] = {}  # (host, local dir) -> remote dir
        self._ship_locks: dict[tuple[str, str], threading.Lock] = {}
        # (host, local directory, remote directory, whether it was sent): what _ship did, in order.
        self.shipments: list[tuple[str, str, str, bool]] = []
        try:
            opened = _threads.outcomes(
                lambda host: SSHConnection(
                    host,
                    config_file=os.fspath(config_file) if config_file else None,
                    key=os.fspath(key) if key else None,
                    accept_new_host_keys=accept_new_host_keys,
                    control_dir=runtime_subdir("ssh", "ctl"),
                ),
                self.hosts,
                "runmap-ssh",
                max_threads=8,
            )
            # Those that opened are closed below if another failed.
            self._connections = {
                host: conn for host, conn in zip(self.hosts, opened, strict=True) if isinstance(conn, SSHConnection)
            }
            failed = _threads.first_error(opened)
            if failed is not None:
                raise failed
            infos = self._bootstrap_all(Env())
        except BaseException:
            self._closed = True
            for conn in self._connections.values():
                conn.close()
            raise
        overrides = resources or {}
        self.placement = Placement(
            {
                host: overrides.get(host)
                or {"CPU": float(info.cpus), "memory": info.memory_gb * 2**30, "GPU": float(info.gpus)}
                for host, info in infos.items()
            },
            default_compute,
        )

    # ------------------------------------------------------------ bootstrap

    def _bootstrap_all(self, env: Env) -> dict[str, HostInfo]:
        infos = _threads.each(lambda h: self.host_info(h, env), self.hosts, "runmap-ssh", max_threads=8)
        return dict(zip(self.hosts, infos, strict=True))

    def host_info(self, host: str, env: Env) -> HostInfo:
        """``host`` prepared for ``env`` (built once per content hash, on the host, and cached)."""
        key = (host, env.content_hash)
        with self._lock:
            info = self._infos.get(key)
            if info is not None:
                return info
            gate = self._bootstrap_locks.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                info = self._infos.get(key)
            if info is None:
                info = bootstrap(
                    self._connections[host], env.reqs + _git_requirements(env), conda_file=_git_conda_file(env)
                )
                with self._lock:
                    self._infos[key] = info
            return info

    # ------------------------------------------------------------ launching

    def _ship(self, host: str, local: Path, info: HostInfo) -> str:
        """``local`` on ``host``: shipped once per content hash (see :func:`ship_directory`)."""
        key = (host, str(local))
        with self._lock:
            gate = self._ship_locks.setdefault(key, threading.Lock())
        with gate:
            # Hashed again on every launch: a directory edited between two launches is shipped anew.
            cache = info.env_dir.rsplit("/envs/", 1)[0]
            remote, sent = ship_directory(self._connections[host], local, cache)
            with self._lock:
                self._shipped[key] = remote
                self.shipments.append((host, str(local), remote, sent))
            return remote

    def _launch(self, env: Env) -> Servlet:
        env.checked_working_dir()  # a ConfigError before a host is taken
        while True:
            host = self.placement.place(env.name, env.compute)
            try:
                return self._launch_on(host, env)
            except BaseException:
                self.placement.release(host, env.compute)
                if self._connections[host].alive():
                    raise
                # The host went away, maybe before its sessions' ends said so (a replacement for one
                # of its replicas can be placed first): it takes nothing more, and the next host is tried.
                self.placement.lose(host)

    def _launch_on(self, host: str, env: Env) -> Servlet:
        conn = self._connections[host]
        info = self.host_info(host, env)
        ours = sys.version_info[:2]
        if tuple(info.python_version[:2]) != ours:
            raise ClusterError(
                f"replica {env.name!r} on {host} would run Python "
                f"{info.python_version[0]}.{info.python_version[1]} ({info.python}), but the client runs Python "
                f"{ours[0]}.{ours[1]}: functions and classes travel pickled by value, which breaks across minor "
                f"versions. Give the host a python{ours[0]}.{ours[1]}, or run the client on "
                f"{info.python_version[0]}.{info.python_version[1]}"
            )
        sys_path: list[str] = []
        if env.git is not None:
            from runmap.envs.git import checkout

            remote_repo = self._ship(host, checkout(env.git), info)
            sys_path.append(f"{remote_repo}/{env.git.path}".removesuffix("/."))
        local_wd = env.checked_working_dir()
        remote_wd = self._ship(host, Path(local_wd), info) if local_wd is not None else None
        log = log_dir(self.name) / f"{env.name}.log"
        token = new_token()
        config: dict[str, Any] = {
            "name": env.name,
            "token": token,
            # A socket file in the host user's private runtime directory, reached through the SSH
            # connection only; no port: another user of the host could take it once the servlet ends.
            "port": None,
            "unix_socket": True,
            "max_body": self.max_body,
            "sys_path": sys_path,
            "working_dir": remote_wd,  # the runner's working directory and first entry of sys.path
        }
        # An argv (no shell in between); the env's variables are set by the runner from its
        # config, so their values show on no command line of the host.
        argv = ["env", "PYTHONUNBUFFERED=1", *servlet_command(info.python, info.python_version[:2])]
        config["env_vars"] = dict(env.env_vars)
        proc, ready, log_start, copier = start_subprocess_servlet(
            conn.command(argv), config, log, name=env.name, timeout=self.start_timeout,
            log_max_bytes=self.log_max_bytes or MAX_LOG_BYTES,
        )
        sock = self._sockets / f"{hashlib.blake2b(env.name.encode(), digest_size=6).hexdigest()}.sock"
        try:
            conn.forward(sock, str(ready["unix"]))
        except BaseException:
            proc.kill()
            proc.wait()
            raise

        def describe_exit(code: int) -> ExitStatus:
            return conn.exit_status(code, tail(log, 5))  # the copier is done: the exit marker is on disk

        def on_release() -> None:
            self.placement.release(host, env.compute)
            conn.cancel_forward(sock)

        process = SubprocessServlet(
            proc, log, log_start, host=host, pid=int(ready["pid"]), describe_exit=describe_exit,
            on_release=on_release, log_copier=copier,
        )
        process.watch(lambda: self._host_check(host))
        return Servlet(env, self, Endpoint(env.name, str(sock), token), process)

    def _host_check(self, host: str) -> None:
        """A session on ``host`` ended: if the connection went with it, the host is lost."""
        if not self._connections[host].alive():
            self.placement.lose(host)

    # ------------------------------------------------------------- closing

    def from_inside(self) -> Callable[[], Cluster]:
        """The same hosts, reached from the one a servlet runs on: the key and host keys travel along.

        See :mod:`runmap.cluster.ssh.access`.
        """
        from runmap.cluster.ssh.access import FromInside, gather

        options = {"resources": self.resources, "default_compute": self.default_compute, "max_body": self.max_body,
                   "stream_logs": self.stream_logs, "start_timeout": self.start_timeout}
        return FromInside(tuple(gather(self.hosts, self.config_file, self.key)), f"{self.name}-inside", options)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Calls ``callback()`` once the cluster has closed its connections."""
        self._closers.append(callback)

    def close(self) -> None:
        """Stops every servlet (each leaves, ending what it forked), then closes the connections."""
        super().close()
        with self._lock:
            connections, self._connections = dict(self._connections), {}
        _threads.each(_close_quietly, connections.values(), "runmap-ssh-close")
        shutil.rmtree(self._sockets, ignore_errors=True)
        closers, self._closers = self._closers, []
        for callback in closers:
            callback()

    def describe_hosts(self) -> dict[str, Any]:
        """Each host's capacity, what is placed there, and whether it is lost."""
        return {
            host: {"total": self.placement.total[host], "used": self.placement.used[host],
                   "lost": host in self.placement.lost}
            for host in self.hosts
        }


def _git_requirements(env: Env) -> tuple[str, ...]:
    """The requirements of a git env's ``reqs_file``, read from its checkout on the client."""
    if env.git is None or not env.git.reqs_file:
        return ()
    from runmap.envs.git import checkout, requirement_lines

    return tuple(requirement_lines(checkout(env.git) / env.git.reqs_file))


def _git_conda_file(env: Env) -> tuple[str, str] | None:
    """A git env's ``conda_file``, read from its checkout on the client: (name, text)."""
    if env.git is None or not env.git.conda_file:
        return None
    from runmap.envs.git import checkout

    return env.git.conda_file, (checkout(env.git) / env.git.conda_file).read_text()


def _close_quietly(conn: SSHConnection) -> None:
    """Closes ``conn``, saying so if it fails: one host's failure must not leave the others' connections open."""
    try:
        conn.close()
    except Exception as exc:
        print(f"runmap: closing the connection to {conn.host} failed: {exc}", file=sys.stderr)


SUN_PATH_MAX = 100  # a Unix socket's path must fit in sockaddr_un (108 bytes, less what ssh appends)


def _socket_dir(unique: str) -> Path:
    """A private directory for the local ends of the forwards, short enough for socket paths."""
    path = runtime_subdir("ssh", unique)
    if len(str(path)) + 18 > SUN_PATH_MAX:
        path = private_dir(Path(tempfile.gettempdir()) / f"runmap-{os.getuid()}-ssh", what="runmap's socket directory")
        path = private_dir(path / unique, what="runmap's socket directory")
    return path
