"""Endpoint: how to reach one servlet, as a small value that can travel.

An endpoint holds a servlet's address (``(host, port)`` over TCP, or the path
of a Unix socket, such as the local end of an SSH forward), the replica's name
and the servlet's token. It can be pickled and sent anywhere, so any process
that holds one (the client, or a Mapper running on the cluster) opens channels
to that replica, whatever kind of cluster it runs on. The token is kept out of
``repr`` and :meth:`describe`, so it never reaches logs or the registry.

    >>> e = Endpoint("power_replica_1", ("127.0.0.1", 41234), token="s3cret")
    >>> e
    Endpoint(name='power_replica_1', address=('127.0.0.1', 41234), keepalive=False)
    >>> e.describe()["address"]
    '127.0.0.1:41234'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runmap.transport.base import Channel

Address = tuple[str, int] | str  # (host, port), or a Unix socket path
INPROCESS = "inprocess:"  # the address of a servlet in this process (unit tests)


@dataclass(frozen=True)
class Endpoint:
    """How to reach one servlet.

    Attributes:
        name: the replica's name, used in errors.
        address: ``(host, port)``, or the path of a Unix socket.
        token: the servlet's own bearer token (hidden from ``repr``).
        keepalive: turn TCP keepalive on, for peers that can vanish without
            closing their sockets (another machine).
        local: the path of the servlet's socket file in its user's private
            runtime directory (a servlet of this machine's local cluster), which
            a client tries before ``address``: it skips the TCP/IP stack. None:
            ``address`` only.
    """

    name: str
    address: Address
    token: str = field(repr=False)
    keepalive: bool = False
    local: str | None = None

    @property
    def unix(self) -> bool:
        return isinstance(self.address, str)

    def open_channel(self) -> Channel:
        """A new connection to the servlet, owned by the caller, who must close it."""
        if isinstance(self.address, str) and self.address.startswith(INPROCESS):
            from runmap.transport.inprocess import channel_to

            return channel_to(self.address)
        from runmap.transport.http import HTTPChannel

        return HTTPChannel(self)

    def describe(self) -> dict[str, Any]:
        """What the registry and ``runmap status`` may show: no token."""
        if isinstance(self.address, str):
            shown = self.address
        else:
            host, port = self.address
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return {"name": self.name, "address": shown}

    def __str__(self) -> str:
        return self.describe()["address"]  # type: ignore[no-any-return]
