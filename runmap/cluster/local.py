"""The embedded local cluster: servlets are subprocesses of this client, on loopback.

Each servlet is ``python -P -m runmap.server`` (:mod:`runmap.server.command`),
started in its own session with its configuration and token on stdin
(:func:`runmap.cluster.process.start_subprocess_servlet`), reached over TCP on
``127.0.0.1`` and watched through its pidfd. Where it can, the servlet is forked
from the client's warm template process instead of started afresh
(:mod:`runmap.cluster.template`): the same servlet, a tenth of a second sooner.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

from runmap.cluster.base import Cluster, new_token
from runmap.cluster.process import SubprocessServlet, start_subprocess_servlet
from runmap.cluster.template import template_for
from runmap.envs.env import Env
from runmap.exceptions import ConfigError
from runmap.paths import SUN_PATH_MAX, log_dir, runtime_subdir
from runmap.server.command import servlet_command
from runmap.servlet import Servlet
from runmap.transport.endpoint import Endpoint

LOOPBACK = "127.0.0.1"
PID_MAX = 4194304  # the largest pid Linux hands out (PID_MAX_LIMIT): names the longest socket file


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
        super().__init__(name, stream_logs)
        self.host = host
        self.max_body = max_body
        self.log_max_bytes = log_max_bytes
        self._socket_dir = socket_dir()

    def from_inside(self) -> Callable[[], Cluster]:
        """A local cluster of the servlet's own: on this machine, its servlets are this one's children."""
        return functools.partial(
            LocalCluster, f"{self.name}-inside", self.host, self.max_body, self.stream_logs, self.log_max_bytes
        )

    def python_for(self, env: Env) -> str:
        """The interpreter a servlet of ``env`` runs on."""
        if env.needs_build:
            from runmap.envs.builder import build_venv

            return build_venv(env)
        return sys.executable

    def _launch(self, env: Env) -> Servlet:
        working_dir = env.checked_working_dir()
        code: list[str] = []
        if env.git is not None:
            from runmap.envs.git import code_dir

            code = [str(code_dir(env.git))]  # fetched once per commit, in the client's cache
        python = self.python_for(env)
        environ = {**os.environ, **env.env_vars, "PYTHONUNBUFFERED": "1"}
        log = log_dir(self.name) / f"{env.name}.log"
        token = new_token()
        config = {
            "name": env.name,
            "token": token,
            "host": self.host,
            "port": 0,
            "unix_socket": self._socket_dir or False,  # also a socket file, which this client uses
            "max_body": self.max_body,
            "sys_path": code + client_sys_path(with_site_packages=not env.needs_build),
            "working_dir": working_dir,
            "log": str(log),  # the servlet writes it, capped at log_max_bytes (runmap/server/logfile.py)
            "log_max_bytes": self.log_max_bytes,
        }
        proc, ready, log_start, _ = start_subprocess_servlet(
            servlet_command(python, sys.version_info[:2]),
            config,
            log,
            name=env.name,
            env=environ,
            cwd=working_dir or os.getcwd(),
            template=template_for(python, environ),
        )
        endpoint = Endpoint(env.name, (self.host, int(ready["port"])), token, local=ready.get("unix"))
        return Servlet(env, self, endpoint, SubprocessServlet(proc, log, log_start))


def socket_dir() -> str | None:
    """This user's private directory for local servlets' socket files (runner.bind_unix).

    The client finds it once, so that no servlet pays for finding it (importing
    ``tempfile`` and ``pathlib`` is most of a forked servlet's start). None, said
    on stderr as the cluster is made, where it is too deep for a socket path: its
    servlets then listen on their loopback port only.
    """
    directory = str(runtime_subdir("servlets"))
    longest = os.path.join(directory, f"{PID_MAX}.sock")
    if len(os.fsencode(longest)) > SUN_PATH_MAX:
        print(
            f"runmap: socket path {longest} is over {SUN_PATH_MAX} bytes: set RUNMAP_HOME to a shorter "
            "directory; local servlets listen on TCP only",
            file=sys.stderr,
        )
        return None
    return directory


def client_sys_path(with_site_packages: bool) -> list[str]:
    """The client's ``sys.path`` for a servlet, so modules importable here import there.

    An env with requirements gets it without the client's site-packages: its venv
    reaches those already, *after* its own, so that the env's pins win.
    """
    paths = [p for p in sys.path if p]
    if with_site_packages:
        return paths
    return [p for p in paths if os.path.basename(p) not in ("site-packages", "dist-packages")]
