"""The embedded local cluster: servlets are subprocesses of this client, on loopback.

Each servlet is ``python -m runmap.server``, started in its own session (so a
Ctrl-C in the terminal reaches the client, which then cleans up, and not the
replicas half-way through a call) with its configuration and token on stdin.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from runmap import logs
from runmap.cluster.base import Cluster
from runmap.envs.env import Env
from runmap.exceptions import ClusterError, ConfigError
from runmap.paths import log_dir, open_private
from runmap.server.command import servlet_command
from runmap.servlet import HTTPServlet, describe_returncode

START_TIMEOUT = 60.0
STOP_GRACE = 3.0
LOOPBACK = "127.0.0.1"


class LocalServlet(HTTPServlet):
    def __init__(self, env: Env, cluster: LocalCluster, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        super().__init__(env.name, env, cluster, cluster.host, port)
        self.proc = proc
        self.log_path = log

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def exit_reason(self) -> str:
        if self.stopped:
            return "stopped by runmap"
        return describe_returncode(self.proc.poll())

    def release(self) -> None:
        super().release()
        if self.proc.poll() is not None:
            _kill_group(self.proc.pid)  # what its user code forked outlives a servlet that was killed
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()  # reaped by poll(); the pipe is all that is left

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.stop()

    def _terminate(self) -> None:
        proc = self.proc
        # End-of-file on its stdin is the servlet's signal to leave: it ends what
        # its user code forked, then itself (runner.leave). SIGKILL if it takes too long.
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if proc.poll() is None:
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _kill_group(proc.pid)
        logs.unfollow(self)


class LocalCluster(Cluster):
    """Servlets as subprocesses on this machine.

    Args:
        name: the cluster's name.
        host: the address servlets listen on. Loopback unless told otherwise:
            servlets run pickles, so only this machine should reach them.
        max_body: the largest request body, in bytes, a servlet accepts.
        stream_logs: print what servlets print on this client's stdout, each
            line prefixed with the replica's name. Their log files are kept either way.
        log_max_bytes: the cap on one replica's log file, past which it is renamed
            ``<replica>.log.1`` (replacing an older one) and a new one begun, so a
            replica keeps at most twice this on disk. None: 64 MiB.

    Example:
        >>> import runmap as rm
        >>> with rm.cluster("local", name="scratch") as c:
        ...     double = rm.function(lambda x: 2 * x).to(c)
        ...     double(21)
        42
    """

    kind = "local"

    def __init__(
        self,
        name: str = "local",
        host: str = LOOPBACK,
        max_body: int = 1 << 30,
        stream_logs: bool = True,
        log_max_bytes: int | None = None,
    ) -> None:
        if log_max_bytes is not None and log_max_bytes < 1:
            raise ConfigError(f"log_max_bytes must be a positive number of bytes, not {log_max_bytes!r}")
        super().__init__(name)
        self.host = host
        self.max_body = max_body
        self.stream_logs = stream_logs
        self.log_max_bytes = log_max_bytes

    def python_for(self, env: Env) -> str:
        """The interpreter a servlet of ``env`` runs on."""
        if env.reqs:
            from runmap.envs.builder import build_venv

            return build_venv(env)
        return sys.executable

    def _launch(self, env: Env) -> LocalServlet:
        if env.working_dir is not None and not os.path.isdir(env.working_dir):
            raise ConfigError(f"working_dir {env.working_dir!r} of env {env.name!r} is not a directory")
        python = self.python_for(env)
        log = log_dir(self.name) / f"{env.name}.log"
        config = {
            "name": env.name,
            "token": self.token,
            "host": self.host,
            "port": 0,
            "max_body": self.max_body,
            "sys_path": client_sys_path(with_site_packages=not env.reqs),
            "working_dir": env.working_dir,
            "log": str(log),  # the servlet writes it, capped at log_max_bytes (runmap/server/logfile.py)
            "log_max_bytes": self.log_max_bytes,
        }
        child_env = {**os.environ, **env.env_vars, "PYTHONUNBUFFERED": "1"}
        log_fd = open_private(log)
        try:
            log_start = os.fstat(log_fd).st_size  # stream this launch's lines only
            proc = subprocess.Popen(
                servlet_command(python, sys.version_info[:2]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_fd,
                env=child_env,
                cwd=env.working_dir or os.getcwd(),
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(config).encode() + b"\n")
            proc.stdin.flush()
            ready = _read_ready_line(proc, START_TIMEOUT)
        except BaseException:
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()
            raise
        proc.stdout.close()
        if ready is None:
            code = proc.poll()
            proc.kill()
            proc.wait()
            proc.stdin.close()
            tail = _tail(log)
            raise ClusterError(
                f"servlet {env.name!r} did not start ({describe_returncode(code)}); its log {log} ends with:\n{tail}"
            )
        servlet = LocalServlet(env, self, int(ready["port"]), proc, log)
        if self.stream_logs:
            logs.follow(servlet, log, log_start)
        return servlet


def _kill_group(pgid: int) -> None:
    """SIGKILL to what is left of a servlet's process group (it leads one: ``start_new_session``)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass  # nothing is left in it


def client_sys_path(with_site_packages: bool) -> list[str]:
    """The client's ``sys.path`` for a servlet, so modules importable here import there.

    An env with requirements gets it without the client's site-packages: its venv
    reaches those already, *after* its own, so that the env's pins win.
    """
    paths = [p for p in sys.path if p]
    if with_site_packages:
        return paths
    return [p for p in paths if os.path.basename(p) not in ("site-packages", "dist-packages")]


def _read_ready_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, int] | None:
    """The servlet's ``{"port": ..}`` line, or None if it died or took too long."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                return None
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return None
            buf += chunk
    try:
        return json.loads(buf.split(b"\n", 1)[0])  # type: ignore[no-any-return]
    except ValueError:
        return None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
