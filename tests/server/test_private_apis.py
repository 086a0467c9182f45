"""The private APIs the servlet leans on, so that an upgrade that breaks them fails here, by name.

runmap/server/protocol.py subclasses uvicorn's ``HttpToolsProtocol`` (not a
public API) and overrides its parser callbacks; runmap/server/app.py swaps the
running loop with ``asyncio.events._set_running_loop``. pyproject.toml pins
uvicorn to the versions this was tested with.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvicorn
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from runmap.server.protocol import BoundedHttpToolsProtocol, bounded_protocol

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _pinned(package: str) -> SpecifierSet:
    dependencies = PYPROJECT.read_text().split("dependencies = [", 1)[1].split("]\n", 1)[0]
    match = re.search(rf'"{package}(?:\[[^\]]*\])?([^"]*)"', dependencies)
    assert match, f"{package} is not among the dependencies in {PYPROJECT}"
    return SpecifierSet(match.group(1))


def test_the_installed_uvicorn_is_in_the_pinned_range() -> None:
    pinned = _pinned("uvicorn")
    assert any(spec.operator == "<" for spec in pinned), f"uvicorn{pinned} has no upper bound"
    assert Version(version("uvicorn")) in pinned, f"uvicorn {version('uvicorn')} is outside uvicorn{pinned}"


# What BoundedHttpToolsProtocol (and CoalescingHttpToolsProtocol) override or call, with the
# parameters they pass: each must be uvicorn's own method, called the same way.
OVERRIDDEN = {
    "__init__": ["self", "config", "server_state", "app_state", "_loop"],
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "exc"],
    "data_received": ["self", "data"],
    "on_header": ["self", "name", "value"],
    "on_headers_complete": ["self"],
    "on_message_complete": ["self"],
    "on_response_complete": ["self"],
    "send_400_response": ["self", "msg"],
    "_should_upgrade": ["self"],  # the switch to call frames (frames.py) rides uvicorn's websocket upgrade
    "handle_websocket_upgrade": ["self"],
}


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_uvicorn_has_the_methods_the_servlet_overrides(name: str) -> None:
    method = HttpToolsProtocol.__dict__.get(name)
    assert inspect.isfunction(method), f"HttpToolsProtocol.{name} is gone"
    assert list(inspect.signature(method).parameters) == OVERRIDDEN[name]
    if name != "__init__":
        assert name in BoundedHttpToolsProtocol.__dict__ or name in BoundedHttpToolsProtocol.__mro__[1].__dict__


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _recv_until_closed(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    got = b""
    while True:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        if not chunk:
            return got
        got += chunk


async def _scenario() -> None:
    loop = asyncio.get_running_loop()
    cls = bounded_protocol("t0ken", head_timeout=30)
    config = uvicorn.Config(_ok, http=cls, lifespan="off", ws="none", log_config=None, log_level="critical")
    config.load()
    state = ServerState()

    async def connect() -> tuple[Any, socket.socket]:
        server_side, client = socket.socketpair()
        client.setblocking(False)
        _, protocol = await loop.connect_accepted_socket(
            lambda: cls(config=config, server_state=state, app_state={}, _loop=loop), server_side
        )
        return protocol, client

    # The attributes uvicorn sets and the subclass reads.
    protocol, client = await connect()
    try:
        for attribute in ("transport", "loop", "parser", "cycle", "headers", "logger", "connections"):
            assert hasattr(protocol, attribute), attribute
        assert protocol.loop is loop and protocol in state.connections
        assert list(cls.unauthenticated) == [protocol] and protocol._head_timer is not None
        # An authenticated request: answered, the connection leaves the unauthenticated ones, no head timer.
        await loop.sock_sendall(client, b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n\r\n")
        reply = await asyncio.wait_for(loop.sock_recv(client, 65536), 5)
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\nok"), reply
        assert not cls.unauthenticated and protocol._head_timer is None
        # Too many headers: 431, closed, and no 400 written after it.
        await loop.sock_sendall(client, b"GET /x HTTP/1.1\r\n" + b"X: 1\r\n" * (cls.max_headers + 1) + b"\r\n")
        reply = await _recv_until_closed(loop, client)
        assert reply.startswith(b"HTTP/1.1 431 ") and b"HTTP/1.1 400" not in reply, reply
    finally:
        client.close()
    # A wrong token leaves the connection unauthenticated; closing it forgets it.
    protocol, client = await connect()
    try:
        await loop.sock_sendall(client, b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0kem\r\n\r\n")
        assert (await asyncio.wait_for(loop.sock_recv(client, 65536), 5)).startswith(b"HTTP/1.1 200 ")
        assert list(cls.unauthenticated) == [protocol]
    finally:
        client.close()
    for _ in range(100):
        if not state.connections:
            break
        await asyncio.sleep(0.01)
    assert not state.connections and not cls.unauthenticated


def test_the_subclass_works_against_the_installed_uvicorn() -> None:
    asyncio.run(_scenario())


def test_httptools_parses_memoryview_slices() -> None:
    """A read that crosses the head limit is fed in two slices of a memoryview."""
    seen: list[tuple[bytes, bytes]] = []

    class Callbacks:
        def on_header(self, name: bytes, value: bytes) -> None:
            seen.append((name, value))

    parser = httptools.HttpRequestParser(Callbacks())
    view = memoryview(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    parser.feed_data(view[:20])
    parser.feed_data(view[20:])
    assert seen == [(b"Host", b"example")]


def test_asyncio_still_has_the_running_loop_setters() -> None:
    get, set_ = asyncio.events._get_running_loop, asyncio.events._set_running_loop
    assert list(inspect.signature(set_).parameters) == ["loop"]

    async def swap() -> None:
        loop = get()
        assert loop is asyncio.get_running_loop()
        set_(None)
        try:
            assert get() is None
        finally:
            set_(loop)
        assert get() is loop

    asyncio.run(swap())
