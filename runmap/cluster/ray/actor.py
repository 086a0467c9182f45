"""The Ray side of a replica: the actor that runs a servlet, and Ray's errors in runmap's terms."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from runmap.exceptions import AllocationError, ClusterError, ReplicaDiedError


class _ServletActor:
    """What runs inside each Ray actor: a servlet in a thread of the actor's process.

    The token arrives as a constructor argument (Ray ships it in the task, never
    on a command line). The actor's main thread stays Ray's, for ``address``,
    ``ping`` and ``stop``; user code runs in the servlet's threads and sees
    Ray's runtime context like any actor code.
    """

    def __init__(
        self, name: str, token: str, client_sys_path: list[str], max_body: int, cluster: str = "ray"
    ) -> None:
        # The client's import path, where it exists on this node, after the
        # runtime_env's own entries: code the client imports by reference (its
        # test modules, its packages) is importable here on one machine or a
        # shared filesystem; elsewhere use working_dir or py_modules.
        for path in client_sys_path:
            if path and path not in sys.path and os.path.exists(path):
                sys.path.append(path)
        os.environ["RUNMAP_REPLICA"] = name
        import threading

        import ray

        from runmap.server.embedded import start_servlet

        self.log = _capture_output(cluster, name)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.servlet = start_servlet(name, token, ray.util.get_node_ip_address(), 0, max_body)
        self._stopped = threading.Event()

    def address(self) -> tuple[str, int, int, str, str]:
        return self.servlet.host, self.servlet.port, os.getpid(), self.node_id, self.log

    def ping(self) -> bool:
        return self.servlet.is_running()

    def wait_stopped(self) -> None:
        """Returns when the servlet is stopped; a call pending here fails when the actor dies."""
        self._stopped.wait()

    def stop(self) -> None:
        self.servlet.stop()
        self._stopped.set()


def _capture_output(cluster: str, name: str) -> str:
    """Sends what the actor's process prints to a log file of its own, as a local servlet's.

    The client streams it, prefixed with the replica's name, like any other
    replica's output (and not through Ray's own forwarding, so that
    ``stream_logs=False`` silences it as it silences the rest).
    """
    from runmap.paths import log_dir, open_private

    path = log_dir(cluster) / f"{name}.log"
    fd = open_private(path)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return str(path)


_actor_class: Any = None


class LostBeforeStart(Exception):
    """The actor died before its servlet started, and not of its own doing (its node died)."""


def servlet_actor_class() -> Any:
    global _actor_class
    if _actor_class is None:
        import ray

        _actor_class = ray.remote(_ServletActor)
    return _actor_class


# ------------------------------------------------------------ translation


@contextlib.contextmanager
def translate_errors(what: str, replica: str | None = None, died: type[Exception] = ReplicaDiedError) -> Iterator[None]:
    """Turns Ray's exceptions into runmap's: the only place that knows Ray's tree.

    Args:
        what: what was being done, to start the message with.
        replica: the replica concerned, if any.
        died: what a dead actor means here: ``ReplicaDiedError`` for a running
            replica, ``ClusterError`` for one that was starting.
    """
    import ray.exceptions as rex

    try:
        yield
    except rex.RuntimeEnvSetupError as exc:
        raise ClusterError(
            f"{what}: Ray could not set up the replica's runtime_env (reqs, working_dir): {exc}"
        ) from exc
    except rex.ActorUnschedulableError as exc:
        raise AllocationError(f"{what}: {exc}") from exc
    except rex.ActorUnavailableError as exc:  # may come back: not known to be dead
        raise ClusterError(f"{what}: {exc}") from exc
    except rex.RayActorError as exc:
        message = f"{what}: {summarize(str(exc))}"
        raise (ReplicaDiedError(message, replica) if died is ReplicaDiedError else died(message)) from exc
    except rex.GetTimeoutError as exc:
        raise ClusterError(f"{what}: Ray did not answer in time") from exc
    except rex.RayError as exc:
        raise ClusterError(f"{what}: {exc}") from exc
    except ConnectionError as exc:  # ray.init could not reach the cluster
        raise ClusterError(f"{what}: {exc}") from exc


def summarize(text: str) -> str:
    """Ray's actor-death message without its bookkeeping lines (ids, pid, namespace)."""
    lines = [line.strip() for line in text.strip().splitlines()]
    kept = [
        line
        for line in lines
        if line
        and not line.startswith(_ACTOR_FIELDS)
        and line not in ("The actor died unexpectedly before finishing this task.",)
    ]
    return "; ".join(kept[:8]) or (lines[0] if lines else "the actor died")


_ACTOR_FIELDS = ("class_name:", "actor_id:", "pid:", "name:", "namespace:", "ip:")
