"""uvicorn's httptools protocol, writing each small response in one system call.

uvicorn writes a response's head when the app sends ``http.response.start``
and its body when the app sends ``http.response.body``: two ``send`` calls,
two TCP segments, and on the client two wake-ups and two ``recv`` calls for
every small call. Here the head is held back until the body's first write and
both go out together (``writelines``: one vectored write, no copy).

Only a complete response head (``HTTP/1.1 ...\\r\\n\\r\\n``, not an interim
``100 Continue``) is held, and it is released by the next write, at the end
of the response (a response to ``HEAD`` has no body write), or by ``close``,
so nothing can be left behind.

It also bounds what a client without the token can make a servlet spend, since
the token is checked only once a request's head is complete (auth.py):

- the size of a request head: httptools has no limit of its own (uvicorn's
  h11 limit does not apply to it), so a header line of 200 MB was read and kept
  whole. Over ``MAX_HEAD_BYTES`` (request line and headers) or ``MAX_HEADERS``
  headers, the answer is 431 and the connection is closed.
- the time a head may take (slowloris): ``HEAD_TIMEOUT`` seconds from the
  connection's start, or from the end of its previous request, until the
  request has arrived; then the connection is closed. A connection that has
  presented the token is the client's own and has no such timer (its idle
  time between requests is uvicorn's keep-alive timeout, as for everyone).
- the number of connections that have not yet sent a request carrying the
  token: over ``MAX_UNAUTHENTICATED``, the oldest of them is closed. The
  client sends its request as soon as it connects, so its own connections
  leave that set at once, and an attacker's cannot take their descriptors.

The class that does this is made per servlet, bound to its token:
:func:`bounded_protocol`. The per-request cost for the client is a few
attribute checks: only bytes that arrive while a head is incomplete are
counted (by ``len``, never looked at), and no timer is armed for it once its
connection's first request has presented the token.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import TYPE_CHECKING, Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from runmap.server.frames import UPGRADE, FrameProtocol, upgrade_response

if TYPE_CHECKING:
    from runmap.server.app import ServletApp

MAX_HEAD_BYTES = 64 << 10  # request line and headers, in bytes
MAX_HEADERS = 100
HEAD_TIMEOUT = 10.0  # seconds a request may take to arrive without the token, from the connection or the last one
HEAD_TIMEOUT_ENV = "RUNMAP_HEAD_TIMEOUT"  # overrides HEAD_TIMEOUT in a servlet's environment (tests)
MAX_UNAUTHENTICATED = 256  # connections that have not yet presented the token

_REFUSAL_BODY = b"request head over the limit"
_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


class _CoalescingTransport:
    """Wraps a transport; holds a response head until the write that follows it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines((held, data))
        elif data[:9] == b"HTTP/1.1 " and data[9:12] != b"100" and data[-4:] == b"\r\n\r\n":
            self._held = bytes(data)
        else:
            self._transport.write(data)

    def writelines(self, lines: Any) -> None:
        self.flush()
        self._transport.writelines(lines)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=CoalescingHttpToolsProtocol)``: one write per small response."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._coalescing = _CoalescingTransport(transport)
        super().connection_made(self._coalescing)  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        self._coalescing.flush()
        super().on_response_complete()


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the limits (already answered)."""


_Base = CoalescingHttpToolsProtocol  # called by name on the hot path: a zero-argument super() costs ~0.5 µs


class BoundedHttpToolsProtocol(_Base):
    """Bounds request heads and unauthenticated connections (see the module's docstring).

    Not used as is: :func:`bounded_protocol` makes a subclass per servlet, with
    its token and its own set of unauthenticated connections.

    The timer of a connection without the token runs from its start, or from
    the end of its previous request, until the end of its next request (head
    and body: nothing it may ask takes long, and no request of its needs a
    body). A connection that presents the token loses its timer once that
    request's head is complete, and never gets another.
    """

    authorization: ClassVar[bytes]  # the Authorization header value that authenticates: b"Bearer <token>"
    frames: ClassVar[tuple[ServletApp, int] | None] = None  # the app that serves call frames, and its body limit
    unauthenticated: ClassVar[dict[BoundedHttpToolsProtocol, None]]  # oldest first
    head_timeout: ClassVar[float] = HEAD_TIMEOUT
    max_head_bytes: ClassVar[int] = MAX_HEAD_BYTES
    max_headers: ClassVar[int] = MAX_HEADERS
    max_unauthenticated: ClassVar[int] = MAX_UNAUTHENTICATED

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True  # whether arriving bytes belong to a request head
        self._head_bytes = 0  # bytes received since that head began (an upper bound)
        self._refused = False
        self._authenticated = False
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._head_timed_out)
        waiting = self.unauthenticated
        waiting[self] = None
        if len(waiting) > self.max_unauthenticated:
            oldest = next(iter(waiting))
            del waiting[oldest]
            oldest.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.unauthenticated.pop(self, None)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            counted = self._head_bytes + len(data)
            if counted > self.max_head_bytes:
                self._cross_head_limit(data)
                return
            self._head_bytes = counted
        _Base.data_received(self, data)

    def _cross_head_limit(self, data: bytes) -> None:
        """Parses ``data`` up to the head limit; refuses the request unless its head ends there."""
        limit = self.max_head_bytes
        room = limit - self._head_bytes
        self._head_bytes = limit
        view = memoryview(data)
        _Base.data_received(self, view[:room])  # type: ignore[arg-type]
        if self.transport.is_closing():
            return
        if self._in_head and self._head_bytes == limit:  # neither in a body nor past the end of the request
            self._refuse()
            return
        self.data_received(view[room:])  # type: ignore[arg-type]  # a body, or the next request: counted as such

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        if len(headers) >= self.max_headers:
            self._refuse()
            raise HeadTooLarge(f"over {self.max_headers} headers")
        _Base.on_header(self, name, value)
        if not self._authenticated:
            name, value = headers[-1]  # as uvicorn keeps it: lowercased, trailing whitespace stripped
            if name == b"authorization" and hmac.compare_digest(value, self.authorization):
                self._authenticated = True
                self.unauthenticated.pop(self, None)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._authenticated and self._head_timer is not None:
            self._cancel_head_timer()
        _Base.on_headers_complete(self)

    def on_message_complete(self) -> None:
        _Base.on_message_complete(self)
        self._in_head = True  # the next byte begins the next request's head
        self._head_bytes = 0
        if not self._authenticated:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _should_upgrade(self) -> bool:
        # uvicorn's hook for websockets, which servlets do not serve: here, the switch of an
        # authenticated connection to call frames (frames.py). Anything else is not an upgrade.
        if self.frames is None or not self._authenticated:
            return False
        return any(name == b"upgrade" and value.lower() == UPGRADE for name, value in self.headers)

    def handle_websocket_upgrade(self) -> None:
        assert self.frames is not None
        app, max_body = self.frames
        self.connections.discard(self)
        self._cancel_head_timer()
        protocol = FrameProtocol(app, self.authorization[len(b"Bearer ") :], max_body)
        self._coalescing.flush()
        transport = self._coalescing._transport
        transport.write(upgrade_response())
        protocol.connection_made(transport)
        transport.set_protocol(protocol)

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refused head was answered (431) and its connection closed
            super().send_400_response(msg)

    def _refuse(self) -> None:
        self._refused = True
        self._cancel_head_timer()
        transport = self.transport
        if not transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:  # not in the middle of a response
                transport.write(_REFUSAL)
            transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self.transport.abort()

    def _cancel_head_timer(self) -> None:
        timer = self._head_timer
        if timer is not None:
            self._head_timer = None
            timer.cancel()


def bounded_protocol(
    token: str, head_timeout: float | None = None, frames: tuple[ServletApp, int] | None = None
) -> type[BoundedHttpToolsProtocol]:
    """The protocol class of one servlet, whose requests carry ``Authorization: Bearer <token>``.

    ``head_timeout`` defaults to ``$RUNMAP_HEAD_TIMEOUT``, or else ``HEAD_TIMEOUT``. With
    ``frames`` (the servlet's app and body limit), an authenticated connection may switch to
    call frames (frames.py).
    """
    if head_timeout is None:
        head_timeout = float(os.environ.get(HEAD_TIMEOUT_ENV, HEAD_TIMEOUT))
    if not head_timeout > 0:
        raise ValueError(f"the head timeout must be positive, not {head_timeout!r}")
    timeout = head_timeout

    class ServletHttpToolsProtocol(BoundedHttpToolsProtocol):
        authorization = f"Bearer {token}".encode()
        unauthenticated = {}
        head_timeout = timeout

    ServletHttpToolsProtocol.frames = frames

    return ServletHttpToolsProtocol
