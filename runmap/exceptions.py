"""The exceptions runmap raises.

Every error runmap raises on its own account derives from :class:`RunmapError`.
Errors of the libraries underneath (``http.client`` and sockets, Ray, boto3)
are translated into this tree in one place each (``runmap.transport.http``,
``runmap.cluster.ray``, ``runmap.cluster.ec2``), so a user never has to catch
a transport library's exception type.

A user's own exception, raised inside a replica, is re-raised on the client as
the *same* type, with the remote traceback attached as ``__cause__``
(:class:`RemoteTraceback`); only when that type cannot travel back does it
arrive as :class:`RemoteError`.

    RunmapError
    ├── ConfigError(ValueError)        bad arguments to runmap's API
    ├── SerializationError             an argument or result did not (un)pickle
    ├── RemoteError                    a user exception that could not travel as itself
    ├── AuthError                      a servlet refused the token
    ├── ProtocolError                  a servlet answered a request with a 4xx/5xx
    ├── ReplicaError                   something happened to a replica
    │   ├── ReplicaDiedError           the replica's process is gone
    │   └── ReplicaTimeoutError(TimeoutError)   a call outlived its timeout
    └── ClusterError                   a cluster could not start or reach a servlet
        ├── AllocationError            no resources for the replicas asked for
        └── HostKeyError               OpenSSH refused a host's key (unknown or changed)
"""

from __future__ import annotations

from runmap._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any


class RunmapError(Exception):
    """Root of every error runmap raises on its own account."""


class ConfigError(RunmapError, ValueError):
    """An argument to runmap's API is invalid."""


class SerializationError(RunmapError):
    """An argument or a result could not be pickled or unpickled.

    Attributes:
        index: position of the input in the map (None for a single call).
        side: ``"argument"`` or ``"result"``.
        replica: name of the replica involved, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        side: str | None = None,
        replica: str | None = None,
    ) -> None:
        super().__init__(message)
        self.index = index
        self.side = side
        self.replica = replica

    def __reduce__(self) -> Any:
        return (_rebuild_serialization_error, (self.args[0], self.index, self.side, self.replica))


def _rebuild_serialization_error(
    message: str, index: int | None, side: str | None, replica: str | None
) -> SerializationError:
    return SerializationError(message, index=index, side=side, replica=replica)


class RemoteError(RunmapError):
    """A user exception raised in a replica that could not be re-raised as its own type.

    Attributes:
        type_name: qualified name of the original exception type.
        remote_traceback: the formatted traceback from the replica.
    """

    def __init__(self, message: str, type_name: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> Any:
        return (RemoteError, (self.args[0], self.type_name, self.remote_traceback))


class RemoteTraceback(Exception):
    """Carries a replica's formatted traceback; set as ``__cause__`` of re-raised errors."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n" + self.tb


class AuthError(RunmapError):
    """A servlet refused the request's token."""


class ProtocolError(RunmapError):
    """A servlet rejected a request (unknown module or method, malformed body...)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ReplicaError(RunmapError):
    """Something happened to a replica. ``replica`` names it."""

    def __init__(self, message: str, replica: str | None = None) -> None:
        super().__init__(message)
        self.replica = replica


class ReplicaDiedError(ReplicaError):
    """A replica's process is gone: exited, killed, or unreachable.

    When an input was lost with its replica more than ``retries`` times,
    ``inputs`` is that input (or chunk) and ``replicas`` maps the replicas that
    died under it, and only those, to what happened to each. When a map fails
    because no replica is left, ``replicas`` maps every replica's name to what
    happened to it and ``inputs`` lists the inputs left undone.
    """

    def __init__(
        self,
        message: str,
        replica: str | None = None,
        *,
        replicas: dict[str, str] | None = None,
        inputs: list[int] | None = None,
    ) -> None:
        super().__init__(message, replica)
        self.replicas = replicas or {}
        self.inputs = inputs or []


class ReplicaTimeoutError(ReplicaError, TimeoutError):
    """A call did not finish within its ``timeout``."""


class ClusterError(RunmapError):
    """A cluster could not start, reach or stop a servlet."""


class AllocationError(ClusterError):
    """No resources could be found for the replicas asked for."""


class HostKeyError(ClusterError):
    """OpenSSH refused to connect to a host because its key is unknown or has changed.

    The message says how to accept a key that is only unknown (``ssh-keyscan``,
    logging in once with ``ssh``, or ``accept_new_host_keys=True``); a changed
    key is never accepted on runmap's account.
    """


__all__ = [
    "AllocationError",
    "AuthError",
    "ClusterError",
    "ConfigError",
    "HostKeyError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "ReplicaDiedError",
    "ReplicaError",
    "ReplicaTimeoutError",
    "RunmapError",
    "SerializationError",
]
