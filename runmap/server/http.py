"""The servlet's HTTP/1.1 server: asyncio's Protocol API, httptools' parser, the servlet's ASGI app.

A servlet serves one client, its own routes (app.py) and nothing else, so the
server is small: HTTP/1.1 with keep-alive and pipelined requests answered in
order, request bodies sized or chunked, handed to the app as they arrive
(reading pauses while the app has not taken ``HIGH_WATER`` bytes), and the
switch of a connection to call frames (frames.py). No websockets, no lifespan
events, no access log, no ``Date`` or ``Server`` header; what the app raises
is written to stderr (the servlet's log) and answered with 500 if no byte of
the response was sent yet.

Each response goes out in one write: the head the app sends
(``http.response.start``) is held until its body (``http.response.body``),
and both leave in one vectored write, one TCP segment for a small call;
otherwise the client would wake and ``recv`` twice for every call.

A connection idle between requests is closed after ``KEEP_ALIVE_TIMEOUT``
seconds. Since the token is checked only once a request's head is complete
(auth.py), the server also bounds what a client without the token can make a
servlet spend:

- the size of a request head: httptools has no limit of its own, so a header
  line of 200 MB would be read and kept whole. Over ``MAX_HEAD_BYTES``
  (request line and headers) or ``MAX_HEADERS`` headers, the answer is 431 and
  the connection is closed.
- the time a request may take to arrive (slowloris): ``HEAD_TIMEOUT`` seconds
  from the connection's start, or from the end of its previous request, to
  the end of the next one (head and body: no request it may make needs a
  body); then the connection is closed. A connection that presented the token
  is the client's own and has no such timer.
- the number of connections that have not yet sent a request carrying the
  token: over ``MAX_UNAUTHENTICATED``, the oldest of them is closed. The client
  sends its request as soon as it connects, so its own connections leave that
  set at once, and an attacker's cannot take their descriptors.

The cost of this for the client is a few attribute checks a request: only the
bytes that arrive while a head is incomplete are counted (by ``len``, never
looked at), and no timer runs while its requests are served.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import httptools

from runmap.server.auth import compare_digest
from runmap.server.frames import UPGRADE, FrameProtocol, frame_server, upgrade_response

MAX_HEAD_BYTES = 64 << 10  # request line and headers, in bytes
MAX_HEADERS = 100
HEAD_TIMEOUT = 10.0  # seconds a request may take to arrive without the token, from the connection or the last one
HEAD_TIMEOUT_ENV = "RUNMAP_HEAD_TIMEOUT"  # overrides HEAD_TIMEOUT in a servlet's environment (tests)
MAX_UNAUTHENTICATED = 256  # connections that have not yet presented the token
KEEP_ALIVE_TIMEOUT = 5.0  # seconds a connection may stay idle between requests
KEEP_ALIVE_TIMEOUT_ENV = "RUNMAP_KEEP_ALIVE_TIMEOUT"  # overrides KEEP_ALIVE_TIMEOUT (tests)
HIGH_WATER = 1 << 20  # request body bytes buffered for the app before reading pauses
BACKLOG = 1024  # connections waiting to be accepted, as runner.bind listens with

_PHRASES = {
    200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 413: "Content Too Large", 422: "Unprocessable Content",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
}  # fmt: skip
_STATUS_LINES: dict[int, bytes] = {}
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_NO_BODY_STATUSES = frozenset({204, 304})


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:  # a status this servlet does not send has no phrase: RFC 9112 allows an empty one
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, "").encode())
    return line


def _closing_reply(status: int, text: bytes) -> bytes:
    return _status_line(status) + (
        b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
        % (len(text), text)
    )


_BAD_REQUEST = _closing_reply(400, b"malformed request")
_HEAD_TOO_LARGE = _closing_reply(431, b"request head over the limit")
_SERVER_ERROR = _closing_reply(500, b"Internal Server Error")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where uvloop is installed (not on Windows), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


class HttpServer:
    """One servlet's server: its app, its token, and the connections it holds.

    Args:
        app: the ASGI app (``build_app``'s), which also serves call frames if it can.
        token: the servlet's token; a request carrying ``Authorization: Bearer <token>``
            authenticates its connection.
        head_timeout: defaults to ``$RUNMAP_HEAD_TIMEOUT``, or else ``HEAD_TIMEOUT``.
        keep_alive_timeout: defaults to ``$RUNMAP_KEEP_ALIVE_TIMEOUT``, or else ``KEEP_ALIVE_TIMEOUT``.
    """

    def __init__(
        self, app: Any, token: str, head_timeout: float | None = None, keep_alive_timeout: float | None = None
    ) -> None:
        self.app = app
        self.token = token.encode()
        self.authorization = b"Bearer " + self.token
        self.frames = frame_server(app)  # the app and body limit that serve call frames, or None
        self.head_timeout = _timeout(head_timeout, HEAD_TIMEOUT_ENV, HEAD_TIMEOUT)
        self.keep_alive_timeout = _timeout(keep_alive_timeout, KEEP_ALIVE_TIMEOUT_ENV, KEEP_ALIVE_TIMEOUT)
        self.connections: set[HttpConnection] = set()
        self.unauthenticated: dict[HttpConnection, None] = {}  # oldest first
        self.upgraded: weakref.WeakSet[FrameProtocol] = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self._stop_asked = False

    def connection(self) -> HttpConnection:
        """A protocol for one new connection (the factory ``loop.create_server`` takes)."""
        return HttpConnection(self)

    def serve(
        self, sock: socket.socket, ready: Callable[[], None] | None = None, also: Sequence[socket.socket] = ()
    ) -> None:
        """Serves on the listening ``sock`` (and those in ``also``) in this thread, on a loop of its own.

        It returns when :meth:`stop` is called.

        ``ready`` is called once connections are accepted.
        """
        loop = self._loop = new_event_loop()
        try:
            loop.run_until_complete(self._serve([sock, *also], ready))
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:  # calls in flight: their clients are gone with the connections
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def stop(self) -> None:
        """Ends :meth:`serve` (from any thread): no more connections, and those open are closed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._stop_asked = True
            return
        try:
            loop.call_soon_threadsafe(self._stop_now)
        except RuntimeError:  # the loop closed meanwhile: serve has ended
            pass

    def _stop_now(self) -> None:
        self._stop_asked = True
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)

    async def _serve(self, socks: list[socket.socket], ready: Callable[[], None] | None) -> None:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        listeners = [await loop.create_server(self.connection, sock=sock, backlog=BACKLOG) for sock in socks]
        if ready is not None:
            ready()
        if not self._stop_asked:
            await self._stop
        for listener in listeners:
            listener.close()
        for connection in list(self.connections):
            connection.transport.abort()
        for frames in list(self.upgraded):
            if frames.transport is not None:
                frames.transport.abort()
        for listener in listeners:
            await listener.wait_closed()
        await asyncio.sleep(0)  # connection_lost, for each


def _timeout(value: float | None, env: str, default: float) -> float:
    if value is None:
        value = float(os.environ.get(env, default))
    if not value > 0:
        raise ValueError(f"a timeout must be positive, not {value!r} (${env})")
    return value


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: parses requests, runs the app for each, writes the responses in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.parser = httptools.HttpRequestParser(self)
        self.lost = False
        self._authenticated = False
        self._in_head = True  # whether arriving bytes belong to a request head
        self._head_bytes = 0  # bytes received since that head began (an upper bound)
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._stopped = False  # no more requests are parsed (refused, closing, switched)
        self._switching = False  # the request parsed switches the connection to call frames
        self._reading = True
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._current: Exchange | None = None  # the request whose response is due
        self._queue: deque[Exchange] = deque()  # pipelined requests behind it
        self._parsing: Exchange | None = None  # the request whose body is arriving (the newest)

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        server.connections.add(self)
        self._head_timer = self.loop.call_later(server.head_timeout, self._head_timed_out)
        waiting = server.unauthenticated
        waiting[self] = None
        if len(waiting) > MAX_UNAUTHENTICATED:
            oldest = next(iter(waiting))
            del waiting[oldest]
            oldest.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._forget()
        for exchange in (self._current, self._parsing, *self._queue):
            if exchange is not None:
                exchange.wake()  # an app waiting for the body gets http.disconnect
        self._queue.clear()

    def eof_received(self) -> bool:
        # The client sent all it will: the requests it completed are answered, then the connection closes.
        return self._finish(None)

    def data_received(self, data: bytes) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._stopped:
            return
        if self._in_head:
            counted = self._head_bytes + len(data)
            if counted > MAX_HEAD_BYTES:
                self._cross_head_limit(data)
                return
            self._head_bytes = counted
        self._feed(data)

    def _feed(self, data: bytes | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._switching:
                self._switch_to_frames(data[upgrade.args[0] :])
            else:  # another upgrade, served as a plain request: the parser reads nothing after it
                self._finish(None)
        except httptools.HttpParserError:
            if not self._stopped:  # else a refusal stopped the parser, or bytes came after a last request
                self._finish(_BAD_REQUEST)

    def _cross_head_limit(self, data: bytes) -> None:
        """Parses ``data`` up to the head limit; refuses the request unless its head ends there."""
        room = MAX_HEAD_BYTES - self._head_bytes
        self._head_bytes = MAX_HEAD_BYTES
        view = memoryview(data)
        self._feed(view[:room])
        if self._stopped:
            return
        if self._in_head and self._head_bytes == MAX_HEAD_BYTES:  # neither in a body nor past the request's end
            self._finish(_HEAD_TOO_LARGE)
            return
        self.data_received(view[room:])  # type: ignore[arg-type]  # a body, or the next request: counted as such

    # ------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            self._finish(_HEAD_TOO_LARGE)
            raise _Refused  # stops the parser
        name = name.lower()
        value = value.rstrip(b" \t")  # httptools keeps trailing whitespace, which is not part of a value
        headers.append((name, value))
        if not self._authenticated and name == b"authorization":
            if compare_digest(value, self.server.authorization):
                self._authenticated = True
                self.server.unauthenticated.pop(self, None)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._authenticated:
            self._cancel_head_timer()
        parser = self.parser
        keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        if parser.should_upgrade():
            if self._may_switch():
                self._switching = True
                return
            keep_alive = False  # the parser reads nothing after an upgrade request: serve it, then close
        url = httptools.parse_url(self._url)
        raw_path = url.path
        path = raw_path.decode("latin-1")
        if "%" in path:
            from urllib.parse import unquote  # here: urllib.parse (and ipaddress) cost an idle servlet 0.4 MB

            path = unquote(path)
        method = parser.get_method().decode("ascii")
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": parser.get_http_version(),
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "root_path": "",
            "headers": self._headers,
        }
        exchange = self._parsing = Exchange(self, scope, keep_alive, method == "HEAD")
        if self._current is None:
            self._current = exchange
            self._start(exchange)
        else:
            self._queue.append(exchange)
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange is None or exchange.done:
            return  # answered already (a refusal, say): the rest of the body is read and dropped
        exchange.chunks.append(body)
        exchange.buffered += len(body)
        if exchange.buffered > HIGH_WATER:
            self._update_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        self._in_head = True  # the next byte begins the next request's head
        self._head_bytes = 0
        if not self._authenticated:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(self.server.head_timeout, self._head_timed_out)
        exchange = self._parsing
        if exchange is None or self._switching:
            return
        exchange.complete = True
        exchange.wake()
        if not exchange.keep_alive:
            self._stopped = True
        elif self._current is None:  # answered before its body ended: idle from here
            self._idle()

    # ------------------------------------------------------------ requests and responses

    def _start(self, exchange: Exchange) -> None:
        self.loop.create_task(self._run(exchange))

    async def _run(self, exchange: Exchange) -> None:
        try:
            await self.server.app(exchange.scope, exchange.receive, exchange.send)
        except Exception as exc:
            scope = exchange.scope
            print(f"runmap servlet: the app failed on {scope['method']} {scope['path']}:", file=sys.stderr)
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        if exchange.done or self.lost:
            return
        # The app ended without completing its response: a 500 if nothing of it was sent, and the end.
        exchange.done = True
        if not exchange.written:
            self.transport.write(_SERVER_ERROR)
        self.transport.close()

    def response_head(self, exchange: Exchange, status: int, headers: Any) -> bytes:
        """The head of ``exchange``'s response, which ``headers`` may make the connection's last."""
        lines = [_status_line(status)]
        sized = close = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                sized = True
            elif lowered == b"connection" and b"close" in value.lower():
                close = True
            lines += (name, b": ", value, b"\r\n")
        if not sized and not (exchange.head_only or status in _NO_BODY_STATUSES or status < 200):
            exchange.keep_alive = False  # no chunked encoding here: the body ends with the connection
        if close:
            exchange.keep_alive = False
        elif not exchange.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def response_done(self, exchange: Exchange) -> None:
        exchange.done = True
        exchange.chunks.clear()
        exchange.buffered = 0
        exchange.wake()
        self._current = None
        if not exchange.keep_alive:
            self.transport.close()
            return
        if self._queue:
            self._current = self._queue.popleft()
            self._start(self._current)
        else:
            self._idle()
        self._update_reading()

    def _update_reading(self) -> None:
        """Reads while no request waits behind another and the app keeps up with the body."""
        parsing = self._parsing
        wanted = not self._queue and (parsing is None or parsing.buffered <= HIGH_WATER)
        if wanted != self._reading and not self.transport.is_closing():
            self._reading = wanted
            if wanted:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _finish(self, reply: bytes | None) -> bool:
        """Parses no more requests: those complete are answered, then the connection closes.

        ``reply`` (a refusal) is written first if no response is due. Returns whether the
        connection stays open meanwhile.
        """
        self._stopped = True
        last = self._queue[-1] if self._queue else self._current
        if last is not None and last.complete:
            last.keep_alive = False
            return True
        if last is None and reply is not None:  # else a body cut short: its app must not wait for the rest
            self.transport.write(reply)
        self.transport.close()
        return False

    # ------------------------------------------------------------ call frames

    def _may_switch(self) -> bool:
        """Whether the upgrade request parsed switches to call frames (only an authenticated, idle connection)."""
        if self.server.frames is None or not self._authenticated or self._current is not None:
            return False
        return any(name == b"upgrade" and value.lower() == UPGRADE for name, value in self._headers)

    def _concurrency(self) -> int | None:
        """The calls a framed connection may run at once, as its upgrade request named them (None: no cap)."""
        for name, value in self._headers:
            if name == b"runmap-concurrency" and value.isdigit():
                return max(1, int(value))
        return None

    def _switch_to_frames(self, rest: bytes | memoryview) -> None:
        assert self.server.frames is not None
        app, max_body = self.server.frames
        self._stopped = True
        self._forget()
        protocol = FrameProtocol(app, self.server.token, max_body, self._concurrency())
        self.server.upgraded.add(protocol)
        transport = self.transport
        transport.write(upgrade_response())
        protocol.connection_made(transport)
        transport.set_protocol(protocol)
        if rest:
            protocol.data_received(bytes(rest))

    # ------------------------------------------------------------ timers

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self.transport.abort()

    def _idle(self) -> None:
        """Closes the connection if no byte arrives within the keep-alive timeout (data_received stops the timer)."""
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.server.keep_alive_timeout, self._idle_timed_out)

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        timer = self._head_timer
        if timer is not None:
            self._head_timer = None
            timer.cancel()

    def _forget(self) -> None:
        """Leaves the server's books and stops the timers: the connection is closed, or no longer HTTP."""
        self.server.connections.discard(self)
        self.server.unauthenticated.pop(self, None)
        self._cancel_head_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class _Refused(Exception):
    """Raised from a parser callback to stop the parser on a request already refused."""


class Exchange:
    """One request and its response: the ASGI ``receive`` and ``send`` of one call of the app."""

    __slots__ = ("connection", "scope", "keep_alive", "head_only", "chunks", "buffered", "complete", "delivered",
                 "waiter", "head", "written", "done")  # fmt: skip

    def __init__(self, connection: HttpConnection, scope: dict[str, Any], keep_alive: bool, head_only: bool) -> None:
        self.connection = connection
        self.scope = scope
        self.keep_alive = keep_alive
        self.head_only = head_only  # a response to HEAD: its body is not sent
        self.chunks: list[bytes] = []  # body received, not yet taken by the app
        self.buffered = 0
        self.complete = False  # the whole request arrived
        self.delivered = False  # the app took the last of its body
        self.waiter: asyncio.Future[None] | None = None
        self.head: bytes | None = None  # the response's head, held until its body
        self.written = False
        self.done = False  # the response was sent (or given up)

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def receive(self) -> dict[str, Any]:
        connection = self.connection
        while not (self.chunks or (self.complete and not self.delivered) or self.done or connection.lost):
            self.waiter = connection.loop.create_future()
            await self.waiter
        if self.done or connection.lost:
            return {"type": "http.disconnect"}
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        paused = self.buffered > HIGH_WATER
        self.buffered = 0
        if paused:
            connection._update_reading()
        self.delivered = self.complete
        return {"type": "http.request", "body": body, "more_body": not self.complete}

    async def send(self, message: dict[str, Any]) -> None:
        connection = self.connection
        if self.head is None:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected http.response.start, not {message['type']!r}")
            self.head = connection.response_head(self, message["status"], message.get("headers", ()))
            return
        if message["type"] != "http.response.body" or self.done:
            raise RuntimeError(f"unexpected {message['type']!r} after the response's body")
        if connection.lost:
            return  # nobody reads it
        body = b"" if self.head_only else message.get("body", b"")
        transport = connection.transport
        if not self.written:
            self.written = True
            if body:
                transport.writelines((self.head, body))  # one vectored write, no copy
            else:
                transport.write(self.head)
        elif body:
            transport.write(body)
        if not message.get("more_body", False):
            connection.response_done(self)
