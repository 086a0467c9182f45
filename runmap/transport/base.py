"""The transport interface: a channel to one servlet."""

from __future__ import annotations

from typing import Any, Protocol


class Channel(Protocol):
    """One connection to one servlet. Not thread-safe: each dispatch slot owns one.

    Every method raises runmap's own errors only: ``ReplicaDiedError`` when the
    servlet can't be reached, ``ReplicaTimeoutError`` when ``timeout`` passes,
    ``AuthError``, ``ProtocolError`` or ``SerializationError`` when it refuses.
    """

    def put_module(self, name: str, payload: bytes) -> bytes:
        """Places a module; returns a serialized outcome (the class's init error, if any)."""
        ...

    def delete_module(self, name: str) -> None: ...

    def call(
        self, module: str, method: str | None, payload: bytes, timeout: float | None = None, in_thread: bool = False
    ) -> bytes:
        """Runs a serialized chunk; returns the serialized outcome.

        ``in_thread`` asks the servlet to run it in a thread even if it would run it on its event loop.
        """
        ...

    def info(self) -> dict[str, Any]: ...

    def ping(self, timeout: float) -> None:
        """Returns once the servlet answers ``GET /health``; raises if it doesn't within ``timeout``."""
        ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """Breaks a call in progress from another thread (it then raises ``ReplicaDiedError``)."""
        ...
