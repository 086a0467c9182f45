"""The HTTP channel: one kept-alive connection to a servlet, spoken over a plain socket.

Why not a client library: on this path the client is the largest cost of a
small call (measured on this project's 2-core machines: 415 µs of client CPU a
request for httpx, 116 µs for ``http.client``, against 97 µs for a whole round
trip of pickles over a raw socket; docs/benchmarks.md has runmap's own runs).
A servlet answers in one shape only (HTTP/1.1, a ``Content-Length``,
keep-alive), so the channel writes requests and reads responses itself: one
``sendall`` for a small request, two for a large one (the body is never
copied into the head), and a large response is received straight into one
preallocated buffer. A channel is used by one thread at a time.

All socket errors are translated here, and only here, into runmap's exceptions.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

from runmap.exceptions import (
    AuthError,
    ProtocolError,
    ReplicaDiedError,
    ReplicaTimeoutError,
    SerializationError,
)
from runmap.transport import framing as frames
from runmap.transport.endpoint import Address, Endpoint

CONNECT_TIMEOUT = 10.0
SMALL_BODY = 64 << 10  # up to this, head and body go out in one send (one segment, one wake-up)
RECV_SIZE = 64 << 10  # a reused receive buffer: no allocation (or mmap) per read
MAX_HEAD = 64 << 10
_TIMEVAL = struct.Struct("ll")  # struct timeval
_CONNECT_TIMEVAL, _NO_TIMEVAL = _TIMEVAL.pack(int(CONNECT_TIMEOUT), 0), _TIMEVAL.pack(0, 0)
_NO_BODY_STATUSES = frozenset({101, 204, 304})
# A peer machine that vanishes without closing its sockets (power loss, partition)
# is noticed by TCP keepalive after about IDLE + INTERVAL * COUNT seconds.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3


class FramesRefused(Exception):
    """The servlet did not switch the connection to frames (an older servlet): calls go over HTTP."""


def set_keepalive(sock: socket.socket) -> None:
    """TCP keepalive on ``sock``, so that a call to a machine that vanished fails instead of waiting."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", 1000 * (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT)),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class HTTPChannel:
    """A channel to the servlet at ``endpoint``, over TCP or a Unix socket."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.replica = endpoint.name
        self.where = str(endpoint)
        host = "localhost" if endpoint.unix else self.where
        self._fixed_headers = (
            f"Host: {host}\r\nAuthorization: Bearer {endpoint.token}\r\n"
            "Content-Type: application/octet-stream\r\n"
        ).encode()
        self._token = endpoint.token.encode()
        self._sock: socket.socket | None = None
        self._framed = False  # whether the connection now carries call frames (then only those)
        self._reader = frames.ResponseReader()  # cuts responses out of a framed connection's bytes
        self._frames_ok = True  # whether the servlet switches connections to frames
        self._timeout: float | None = None  # the socket's timeout now: setting it is a syscall
        self._buf = b""  # bytes received past the end of the last response
        self._recv_buf = bytearray(RECV_SIZE)
        self._recv_view = memoryview(self._recv_buf)
        self._aborted = False

    # ------------------------------------------------------------ interface

    def put_module(self, name: str, payload: bytes) -> bytes:
        return self._request(b"PUT", f"/modules/{quote(name, safe='')}", payload, None)

    def delete_module(self, name: str) -> None:
        self._request(b"DELETE", f"/modules/{quote(name, safe='')}", b"", None)

    def call(
        self, module: str, method: str | None, payload: bytes, timeout: float | None = None, in_thread: bool = False
    ) -> bytes:
        method = method or "__call__"
        if self._frames_ok:
            try:
                return self._on_connection(
                    lambda sock: self._frame_exchange(sock, module, method, payload, timeout, in_thread), framed=True
                )
            except FramesRefused:
                self._frames_ok = False  # a servlet without frames: calls go over HTTP
        path = f"/call/{quote(module, safe='')}/{quote(method, safe='')}"
        if in_thread:
            path += "?thread"
        return self._request(b"POST", path, payload, timeout)

    def open_framed(self, concurrency: int | None = None) -> socket.socket:
        """A new connection, switched to frames, handed over: the caller writes and reads frames on it.

        This channel keeps nothing of it. The dispatcher of a Mapper's calls
        (runmap/mapper/dispatch.py) keeps several calls in flight on it; the
        servlet runs at most ``concurrency`` of them at once, and queues the
        rest in the order they came (runmap/server/frames.py).

        Raises:
            FramesRefused: the servlet does not serve frames of this version.
            ReplicaDiedError, AuthError: as :meth:`call` does.
        """
        return self._connect_framed(concurrency)

    def info(self) -> dict[str, Any]:
        return json.loads(self._request(b"GET", "/info", b"", None))  # type: ignore[no-any-return]

    def ping(self, timeout: float) -> None:
        self._request(b"GET", "/health", b"", timeout)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._buf = b""
        self._framed = False
        if sock is not None:
            sock.close()

    def abort(self) -> None:
        self._aborted = True
        sock = self._sock
        if sock is not None:
            try:
                # shutdown, not close: it wakes a thread blocked reading this socket.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------ internals

    def _connect(self) -> socket.socket:
        if self._aborted:
            raise ReplicaDiedError(f"the channel to {self.replica} was aborted", self.replica)
        endpoint = self.endpoint
        with self._translate(None):
            sock = _connect_local(endpoint.local) if endpoint.local else None
            if sock is None and endpoint.local and _on_loopback(endpoint.address):
                # The servlet's socket file and loopback are this machine's: no servlet listening on
                # the file means no servlet, and whoever holds its port now (any user may bind it once
                # the servlet is gone) must not get this request.
                gone = f"{self.replica} is gone: nothing listens on its socket {endpoint.local}"
                raise ReplicaDiedError(gone, self.replica)
            if sock is None:
                sock = _connect_address(endpoint)
        sock.settimeout(None)
        self._timeout = None
        self._buf = b""
        return sock

    def _request(self, method: bytes, path: str, body: bytes, timeout: float | None) -> bytes:
        return self._on_connection(lambda sock: self._exchange(sock, method, path, body, timeout), framed=False)

    def _on_connection(self, exchange: Callable[[socket.socket], bytes], framed: bool) -> bytes:
        """``exchange`` on the kept-alive connection, switched to frames or not as asked."""
        reused = self._sock is not None and self._framed == framed
        sock = self._socket(framed)
        try:
            return exchange(sock)
        except ReplicaDiedError:
            self.close()
            # A kept-alive connection can be closed under us (a servlet restart, an
            # idle timeout in a proxy). Try once more on a fresh connection: if the
            # servlet is really gone, that connect fails at once.
            if not reused or self._aborted:
                raise
            sock = self._socket(framed)
            try:
                return exchange(sock)
            except BaseException:
                self.close()
                raise
        except BaseException:
            # A timeout or an interrupt leaves the connection mid-response: never reuse it.
            self.close()
            raise

    def _socket(self, framed: bool) -> socket.socket:
        """The connection, opened if need be, and switched to frames if ``framed`` (and back if not)."""
        if self._sock is not None and self._framed != framed:
            self.close()  # a framed connection carries calls only: HTTP needs a connection of its own
        if self._sock is None:
            if framed:
                self._sock, self._reader = self._connect_framed(), frames.ResponseReader()
            else:
                self._sock = self._connect()
            self._framed = framed
        return self._sock

    def _connect_framed(self, concurrency: int | None = None) -> socket.socket:
        """A new connection, switched to call frames."""
        sock = self._connect()
        try:
            self._upgrade(sock, concurrency)
            if self._buf:  # the servlet spoke before it was asked: not a servlet this client knows
                raise ProtocolError(f"{self.replica} sent bytes after switching to frames, unasked", 502)
        except BaseException:
            sock.close()
            raise
        return sock

    def _upgrade(self, sock: socket.socket, concurrency: int | None = None) -> None:
        """Switches a fresh connection to call frames (runmap/server/frames.py), presenting the token."""
        cap = b"" if concurrency is None else b"Runmap-Concurrency: %d\r\n" % concurrency
        head = b"GET /frames HTTP/1.1\r\n%s%sConnection: Upgrade\r\nUpgrade: %s\r\nContent-Length: 0\r\n\r\n" % (
            self._fixed_headers,
            cap,
            frames.UPGRADE,
        )
        with self._translate(None):
            sock.sendall(head)
            status, length, _ = self._read_head(sock)
            data = b"" if status == 101 else self._read_body(sock, length)
        if status == 101:
            return
        if status == 401:
            raise status_error(self.replica, status, bytes(data))
        raise FramesRefused(status)

    def _frame_exchange(
        self, sock: socket.socket, module: str, method: str, payload: bytes, timeout: float | None, in_thread: bool
    ) -> bytes:
        head = frames.request_head(
            self._token, module.encode(), method.encode(), len(payload), frames.IN_THREAD if in_thread else 0
        )
        reader = self._reader
        with self._translate(timeout):
            self._send(sock, head, payload, timeout)
            done: list[tuple[int, int, bytes]] = []
            while not done:
                n = sock.recv_into(reader.buffer())
                if not n:
                    raise ConnectionResetError("the servlet closed the connection")
                done = reader.received(n)
        _, status, data = done[0]  # one call at a time on this channel: the answer is to it
        if status == 200:
            return data
        raise status_error(self.replica, status, bytes(data))

    def _exchange(self, sock: socket.socket, method: bytes, path: str, body: bytes, timeout: float | None) -> bytes:
        head = b"%s %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (
            method,
            path.encode(),
            self._fixed_headers,
            len(body),
        )
        with self._translate(timeout):
            self._send(sock, head, body, timeout)
            status, length, keep_alive = self._read_head(sock)
            data = self._read_body(sock, length)
        if not keep_alive:
            self.close()
        if status in (200, 204):
            return data
        raise status_error(self.replica, status, bytes(data))

    def _send(self, sock: socket.socket, head: bytes, body: bytes, timeout: float | None) -> None:
        """Sends a request: in one ``sendall`` if small, else head then body (never copied into one)."""
        if timeout != self._timeout:
            sock.settimeout(timeout)
            self._timeout = timeout
        if len(body) <= SMALL_BODY:
            sock.sendall(head + body)
        else:
            sock.sendall(head)
            sock.sendall(body)

    def _read_head(self, sock: socket.socket) -> tuple[int, int, bool]:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > MAX_HEAD:
                raise ProtocolError(f"{self.replica} sent a response head over {MAX_HEAD} bytes", 502)
            n = sock.recv_into(self._recv_buf)
            if not n:
                raise ConnectionResetError("the servlet closed the connection")
            buf += self._recv_view[:n]
            end = buf.find(b"\r\n\r\n")
        self._buf = buf[end + 4 :]
        lines = buf[:end].split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise ProtocolError(f"{self.replica} sent a malformed status line {lines[0][:80]!r}", 502) from None
        length = -1
        keep_alive = True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep_alive = False
            elif name == b"transfer-encoding":
                raise ProtocolError(f"{self.replica} sent a {value.strip()!r} response, not a sized one", 502)
        if length < 0:
            if status in _NO_BODY_STATUSES:
                length = 0
            else:
                raise ProtocolError(f"{self.replica} sent a response without a Content-Length", 502)
        return status, length, keep_alive

    def _read_body(self, sock: socket.socket, length: int) -> bytes:
        have = self._buf
        if len(have) >= length:
            self._buf = have[length:]
            return have if len(have) == length else have[:length]
        self._buf = b""
        # Receive the rest straight into the final buffer: no joins, no copies.
        body = bytearray(length)
        view = memoryview(body)
        view[: len(have)] = have
        got = len(have)
        while got < length:
            n = sock.recv_into(view[got:], min(length - got, 4 << 20))
            if not n:
                raise ConnectionResetError("the servlet closed the connection mid-response")
            got += n
        return body  # type: ignore[return-value]  # a bytearray: pickle reads it as it reads bytes

    @contextlib.contextmanager
    def _translate(self, timeout: float | None) -> Iterator[None]:
        try:
            yield
        except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
            if timeout is None:
                raise ReplicaDiedError(
                    f"{self.replica} at {self.where} did not answer within {CONNECT_TIMEOUT:g} s",
                    self.replica,
                ) from exc
            raise ReplicaTimeoutError(
                f"a call on {self.replica} did not finish within its timeout of {timeout:g} s", self.replica
            ) from exc
        except (ConnectionError, OSError) as exc:
            raise ReplicaDiedError(
                f"{self.replica} at {self.where} is unreachable: {exc!r}", self.replica
            ) from exc


def status_error(replica: str, status: int, data: bytes) -> Exception:
    """The error a servlet's refusal (a status other than 200, with its JSON detail) stands for."""
    try:
        detail = json.loads(data)
    except ValueError:
        detail = {"detail": data[:200].decode("utf-8", "replace")}
    if not isinstance(detail, dict):
        detail = {"detail": detail}
    message = f"{replica}: {detail.get('detail', detail)}"
    if status == 401:
        return AuthError(f"{replica} refused the token (401)")
    if status == 422:
        return SerializationError(message, side=detail.get("side"), replica=replica)
    return ProtocolError(f"{message} (HTTP {status})", status)


def _connect_address(endpoint: Endpoint) -> socket.socket:
    """A connection to ``endpoint.address``: TCP (no delay, keepalive if asked), or a Unix socket's path."""
    address = endpoint.address
    if isinstance(address, str):
        return _unix_connection(address)
    sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if endpoint.keepalive:
        set_keepalive(sock)
    return sock


def _on_loopback(address: Address) -> bool:
    return isinstance(address, tuple) and (address[0].startswith("127.") or address[0] in ("::1", "localhost"))


def _connect_local(path: str) -> socket.socket | None:
    """A connection to the servlet's socket file (runner.bind_unix); None if nothing listens there.

    The file is in the user's private runtime directory, so no other user can
    have put one there: what answers is the servlet, or nothing.
    """
    try:
        return _unix_connection(path)
    except OSError:  # the servlet is gone, or this is another machine than its
        return None


def _unix_connection(path: str) -> socket.socket:
    """A connection to the Unix socket ``path``.

    A listener whose backlog is full makes a non-blocking connect fail at once
    (EAGAIN), where TCP would wait; so the connect blocks, for at most
    CONNECT_TIMEOUT (``SO_SNDTIMEO``, reset after).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _CONNECT_TIMEVAL)
        sock.connect(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _NO_TIMEVAL)
    except BaseException:
        sock.close()
        raise
    return sock
