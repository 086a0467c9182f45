"""A channel that calls a :class:`ServletState` in this process.

For unit tests of everything above the transport (the Mapper's dispatch,
ordering, retries) without starting processes. Payloads are still pickled
both ways, so what can't travel over HTTP can't travel here either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from runmap.exceptions import ReplicaDiedError
from runmap.server.state import ServletState

_servlets: dict[str, tuple[ServletState, Callable[[], bool]]] = {}
_lock = threading.Lock()


def serve(address: str, state: ServletState, alive: Callable[[], bool]) -> None:
    """Makes ``state`` reachable at ``address`` (an ``inprocess:`` endpoint address)."""
    with _lock:
        _servlets[address] = (state, alive)


def unserve(address: str) -> None:
    with _lock:
        _servlets.pop(address, None)


def channel_to(address: str) -> InProcessChannel:
    with _lock:
        entry = _servlets.get(address)
    if entry is None:
        dead = ServletState(address)
        return InProcessChannel(dead, lambda: False)
    return InProcessChannel(*entry)


class InProcessChannel:
    def __init__(self, state: ServletState, alive: Any = lambda: True) -> None:
        self.state = state
        self._alive = alive

    def _check(self) -> None:
        if not self._alive():
            raise ReplicaDiedError(f"{self.state.name} is stopped", self.state.name)

    def put_module(self, name: str, payload: bytes) -> bytes:
        self._check()
        return self.state.place_module(name, payload)

    def delete_module(self, name: str) -> None:
        self._check()
        self.state.delete_module(name)

    def call(
        self, module: str, method: str | None, payload: bytes, timeout: float | None = None, in_thread: bool = False
    ) -> bytes:
        self._check()
        return self.state.call(module, method, payload)

    def info(self) -> dict[str, Any]:
        self._check()
        return self.state.info()

    def ping(self, timeout: float) -> None:
        self._check()

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass
