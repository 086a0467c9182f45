"""The servlet's HTTP/1.1 server (runmap/server/http.py), as a client sees it.

Most tests speak raw HTTP to a real servlet process (keep-alive, pipelining,
chunked and large bodies, ``Connection: close``, malformed requests, clients
that leave mid-body, the idle timeout). What the servlet's own app never does
(raise, hang, leave a response unfinished, hold back from reading a body) is
served by the same server on a real socket in this process, with an app of the
test's own.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

import runmap as rm
from runmap import serialization as ser
from runmap.server import http
from runmap.server.runner import bind
from runmap.transport import framing

KEEP_ALIVE = 1.0  # the servlet's idle timeout, set through its environment
SLACK = 4.0  # how much later than its timeout a connection may close
AT_ONCE = KEEP_ALIVE / 2  # a connection closed "at once" is closed well before its idle timeout would close it
TOKEN = "t0ken"


@dataclass
class Servlet:
    address: tuple[str, int]
    token: str
    len: str  # module names of functions placed on the servlet
    crc32: str
    sleep: str


@pytest.fixture(scope="module")
def servlet() -> Iterator[Servlet]:
    env = rm.env(name="http", env_vars={http.KEEP_ALIVE_TIMEOUT_ENV: str(KEEP_ALIVE)})
    with rm.LocalCluster(name="http-test") as cluster:
        remote = {f.__name__: rm.function(f).to(cluster, env=env) for f in (len, zlib.crc32, time.sleep)}
        (s,) = cluster.servlets
        host, port = s.endpoint.address  # type: ignore[misc]
        yield Servlet((host, port), s.endpoint.token, remote["len"].module_name, remote["crc32"].module_name,
                      remote["sleep"].module_name)  # fmt: skip


# ------------------------------------------------------------------ a raw HTTP client


def request(
    method: str, path: str, token: str | None = None, body: bytes = b"", headers: str = "", length: int | None = None
) -> bytes:
    """A request's bytes; ``length`` is the Content-Length it declares (by default, the body's)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    declared = len(body) if length is None else length
    length_header = "" if "chunked" in headers.lower() else f"Content-Length: {declared}\r\n"
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{length_header}{headers}\r\n".encode() + body


def call(s: Servlet, module: str, arg: Any, headers: str = "") -> bytes:
    return request("POST", f"/call/{module}/__call__", s.token, ser.dump_call(ser.STAR, [(arg,)], None), headers)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def result(self) -> Any:
        assert self.status == 200, (self.status, self.body[:200])
        (result,) = ser.load_outcome(self.body).results
        return result


class Client:
    """One connection, reading responses sized by their Content-Length."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        assert chunk, f"the servlet closed the connection (unread: {self.buf[:80]!r})"
        return chunk

    def response(self, head_only: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} twice"
            headers[name.lower()] = value.strip()
        length = 0 if head_only else int(headers["content-length"])
        while len(self.buf) < length:
            self.buf += self._recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        return Response(int(status_line.split()[1]), headers, body)

    def closed_within(self, seconds: float) -> float:
        """Seconds until the servlet closes the connection; fails if it sends anything or is still open."""
        start = time.monotonic()
        deadline = start + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                chunk = b""
            assert not chunk, f"the servlet sent {chunk[:80]!r}"
            return time.monotonic() - start
        pytest.fail(f"the connection is still open after {seconds:g} s")


def still_works(s: Servlet) -> None:
    with Client(s.address) as c:
        c.send(call(s, s.len, "four"))
        assert c.response().result() == 4


# ------------------------------------------------------------------ a real servlet


def test_one_connection_serves_request_after_request(servlet: Servlet) -> None:
    with Client(servlet.address) as c:
        for i in range(5):
            c.send(request("GET", "/info", servlet.token))
            info = c.response()
            assert info.status == 200 and "connection" not in info.headers
            assert json.loads(info.body)["name"] == "http"
            c.send(call(servlet, servlet.len, "x" * i))
            assert c.response().result() == i
        c.send(request("HEAD", "/info", servlet.token))  # a response to HEAD has no body, and the connection goes on
        head = c.response(head_only=True)
        assert head.status == 405 and int(head.headers["content-length"]) > 0
        c.send(request("GET", "/health"))
        assert json.loads(c.response().body) == {"status": "ok"}
        assert not c.buf


def test_pipelined_requests_are_answered_in_order(servlet: Servlet) -> None:
    with Client(servlet.address) as c:
        c.send(
            call(servlet, servlet.sleep, 0.3)  # the first is the slowest: answers keep the order of the requests
            + call(servlet, servlet.len, "bb")
            + request("GET", "/info", servlet.token)
            + request("GET", "/nowhere", servlet.token)
            + call(servlet, servlet.len, "dddd")
        )
        assert c.response().result() is None
        assert c.response().result() == 2
        assert json.loads(c.response().body)["name"] == "http"
        assert c.response().status == 404
        assert c.response().result() == 4


def test_a_chunked_body_arrives_whole(servlet: Servlet) -> None:
    data = bytes(range(256)) * 1500
    payload = ser.dump_call(ser.STAR, [(data,)], None)
    cuts = [0, 1, 100, 70_000, 70_001, 300_000, len(payload)]
    pieces = [payload[start:end] for start, end in zip(cuts, cuts[1:], strict=False)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    head = request("POST", f"/call/{servlet.crc32}/__call__", servlet.token, headers="Transfer-Encoding: chunked\r\n")
    with Client(servlet.address) as c:
        c.send(head)
        c.send(chunks[:50_000])  # in several reads
        c.send(chunks[50_000:] + b"0\r\n\r\n")
        assert c.response().result() == zlib.crc32(data)
        c.send(call(servlet, servlet.len, "abc"))  # and the connection goes on
        assert c.response().result() == 3


def test_a_64_mb_body_arrives_whole(servlet: Servlet) -> None:
    data = bytes(range(256)) * (1 << 18)  # 64 MiB
    with Client(servlet.address) as c:
        c.send(call(servlet, servlet.crc32, data))
        assert c.response().result() == zlib.crc32(data)


def test_connection_close_is_honoured(servlet: Servlet) -> None:
    with Client(servlet.address) as c:
        c.send(request("GET", "/info", servlet.token, headers="Connection: close\r\n"))
        response = c.response()
        assert response.status == 200 and response.headers["connection"] == "close"
        c.closed_within(AT_ONCE)
    with Client(servlet.address) as c:  # HTTP/1.0 closes after each request unless it asks otherwise
        c.send(f"GET /info HTTP/1.0\r\nAuthorization: Bearer {servlet.token}\r\n\r\n".encode())
        assert c.response().status == 200
        c.closed_within(AT_ONCE)


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /info HTTP/1.1\r\nBad Header\r\n\r\n",
        b"POST /call/x/y HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ],
    ids=["request line", "header", "content-length", "version"],
)
def test_a_malformed_request_gets_400_and_the_connection_closes(servlet: Servlet, raw: bytes) -> None:
    with Client(servlet.address) as c:
        c.send(request("GET", "/health"))  # after a good request on the same connection
        assert c.response().status == 200
        c.send(raw)
        assert c.response().status == 400
        c.closed_within(AT_ONCE)
    still_works(servlet)


def test_a_client_that_leaves_mid_body_does_not_break_the_servlet(servlet: Servlet) -> None:
    payload = ser.dump_call(ser.STAR, [(b"x" * (8 << 20),)], None)
    for headers, body in [
        ("", payload[: 1 << 20]),
        ("Transfer-Encoding: chunked\r\n", b"100000\r\n" + payload[: 1 << 19]),
    ]:
        for _ in range(3):
            with Client(servlet.address) as c:
                c.send(request("POST", f"/call/{servlet.len}/__call__", servlet.token, body, headers, len(payload)))
        still_works(servlet)


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(servlet: Servlet) -> None:
    for token in (servlet.token, None):  # authenticated or not
        with Client(servlet.address) as c:
            c.send(request("GET", "/info", token))
            assert c.response().status in (200, 401)
            waited = c.closed_within(KEEP_ALIVE + SLACK)
        assert waited >= KEEP_ALIVE / 2, f"closed after {waited:.2f} s, before its idle timeout"


def test_a_connection_switched_to_frames_has_no_idle_timeout(servlet: Servlet) -> None:
    with Client(servlet.address) as c:
        upgrade = f"Connection: Upgrade\r\nUpgrade: {framing.UPGRADE.decode()}\r\n"
        c.send(request("GET", "/frames", servlet.token, headers=upgrade))
        assert c.response(head_only=True).status == 101
        deadline = time.monotonic() + KEEP_ALIVE * 2
        c.sock.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                peeked = c.sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                continue
            pytest.fail(f"the servlet closed an idle framed connection (read {peeked!r})")
        c.sock.settimeout(10)
        body = ser.dump_call(ser.STAR, [("abc",)], None)
        c.send(framing.request_head(servlet.token.encode(), servlet.len.encode(), b"__call__", len(body)) + body)
        while len(c.buf) < framing.RESPONSE.size:
            c.buf += c._recv()
        call_id, status, length = framing.RESPONSE.unpack_from(c.buf)
        while len(c.buf) < framing.RESPONSE.size + length:
            c.buf += c._recv()
        assert status == 200
        assert ser.load_outcome(c.buf[framing.RESPONSE.size :]).results == [3]


# ------------------------------------------------------------------ the server in this process, with a test's app


@contextmanager
def serving(app: Any, **options: Any) -> Iterator[tuple[http.HttpServer, tuple[str, int]]]:
    sock = bind("127.0.0.1", 0)
    server = http.HttpServer(app, TOKEN, **options)
    ready = threading.Event()
    thread = threading.Thread(target=server.serve, args=(sock,), kwargs={"ready": ready.set}, name="test-http-server")
    thread.start()
    try:
        assert ready.wait(10)
        yield server, sock.getsockname()
    finally:
        server.stop()
        thread.join(10)
        sock.close()
    assert not thread.is_alive()


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


class Misbehaving:
    """An app that does, on each path, one of the things the servlet's app never does."""

    def __init__(self) -> None:
        self.hung: asyncio.Event | None = None
        self.read = threading.Event()  # /slow-reader takes its body once this is set
        self.heard: list[str] = []  # what /read-all was told, up to the end of the body or the client's leaving
        self.done = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        if path == "/raise":
            raise ZeroDivisionError("raised")
        elif path == "/raise-after-start":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            raise KeyError("after start")
        elif path == "/raise-mid-body":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            raise KeyError("mid body")
        elif path == "/no-response":
            return
        elif path == "/hang":
            self.hung = asyncio.Event()
            await self.hung.wait()  # never set
        elif path == "/slow-reader":
            await asyncio.get_running_loop().run_in_executor(None, self.read.wait, 30)
            size = 0
            while True:
                message = await receive()
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            await _respond(send, 200, str(size).encode())
        elif path == "/read-all":
            while True:
                message = await receive()
                self.heard.append(message["type"])
                if not message.get("more_body"):
                    break
            self.done.set()
            await _respond(send, 200, b"read")
        else:
            await _respond(send, 200, b"ok")


def test_an_app_exception_gets_500_and_the_server_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(Misbehaving()) as (_, address):
        for path in ("/raise", "/raise-after-start", "/no-response"):  # nothing of a response was sent yet
            with Client(address) as c:
                c.send(request("GET", path))
                response = c.response()
                assert response.status == 500 and response.headers["connection"] == "close", path
                c.closed_within(SLACK)
        with Client(address) as c:
            c.send(request("GET", "/raise-mid-body"))  # a response half sent can only be cut off
            c.sock.settimeout(10)
            got = b""
            while chunk := c.sock.recv(65536):
                got += chunk
            assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\nab"), got
        with Client(address) as c:
            c.send(request("GET", "/ok"))
            assert c.response().body == b"ok"
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "KeyError: 'after start'" in err and "/raise-mid-body" in err


def test_a_response_never_completed_holds_up_no_other_connection() -> None:
    app = Misbehaving()
    with serving(app) as (_, address), Client(address) as hung:
        hung.send(request("GET", "/hang"))
        for _ in range(3):
            with Client(address) as c:
                c.send(request("GET", "/ok"))
                assert c.response().body == b"ok"
        assert app.hung is not None  # the hung request is in the app; stopping the server ends it


def test_the_app_hears_of_a_client_that_left_mid_body() -> None:
    app = Misbehaving()
    with serving(app) as (_, address):
        with Client(address) as c:
            c.send(request("POST", "/read-all", body=b"x" * 1000, length=10_000))
            deadline = time.monotonic() + 10
            while "http.request" not in app.heard:
                assert time.monotonic() < deadline, "the app got no part of the body"
                time.sleep(0.01)
        assert app.done.wait(10), f"the app still waits for the body of a client that left (told {app.heard})"
        assert app.heard[-1] == "http.disconnect"


def test_a_request_answered_before_its_body_ended_leaves_its_connection_idle_after_it() -> None:
    with serving(Misbehaving(), keep_alive_timeout=KEEP_ALIVE) as (_, address), Client(address) as c:
        c.send(request("POST", "/ok", TOKEN, length=1000))
        assert c.response().body == b"ok"  # the app answered without reading the body
        c.send(b"x" * 1000)  # the end of the request: the connection is idle from here
        waited = c.closed_within(KEEP_ALIVE + SLACK)
    assert waited >= KEEP_ALIVE / 2, f"closed after {waited:.2f} s, before its idle timeout"


def test_reading_pauses_while_the_app_does_not_take_the_body() -> None:
    app = Misbehaving()
    size = 64 << 20
    body = memoryview(bytes(size))
    with serving(app) as (_, address), Client(address) as c:
        c.send(request("POST", "/slow-reader", length=size))
        sent = 0
        c.sock.settimeout(1.0)
        try:
            while sent < size:
                sent += c.sock.send(body[sent : sent + (1 << 20)])
        except TimeoutError:
            pass
        assert sent < size // 2, f"the server took {sent >> 20} MiB the app did not read"
        app.read.set()
        c.sock.settimeout(10)
        c.send(body[sent:])
        assert c.response().body == str(size).encode()


def test_a_response_goes_out_in_one_write() -> None:
    class Recorder(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[bytes] = []

        def write(self, data: Any) -> None:
            self.writes.append(bytes(data))

        def writelines(self, lines: Any) -> None:
            self.writes.append(b"".join(lines))

        def is_closing(self) -> bool:
            return False

        def close(self) -> None:
            pass

    async def scenario() -> list[bytes]:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await _respond(send, 200, b"x" * 100)

        connection = http.HttpServer(app, TOKEN).connection()
        transport = Recorder()
        connection.connection_made(transport)
        connection.data_received(request("GET", "/", TOKEN))
        while not transport.writes:
            await asyncio.sleep(0)
        connection.connection_lost(None)
        return transport.writes

    writes = asyncio.run(scenario())
    assert len(writes) == 1, writes
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\n" + b"x" * 100)


def test_a_connection_leaves_the_unauthenticated_ones_with_the_token() -> None:
    def wait_for(predicate: Any) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    with serving(Misbehaving()) as (server, address):
        with Client(address) as wrong, Client(address) as right:
            wait_for(lambda: len(server.unauthenticated) == 2)
            wrong.send(request("GET", "/ok", "not-the-token"))
            assert wrong.response().status == 200  # the app decides what to answer; the server only counts
            right.send(request("GET", "/ok", TOKEN))
            assert right.response().status == 200
            wait_for(lambda: len(server.unauthenticated) == 1)
            assert len(server.connections) == 2
        wait_for(lambda: not server.connections and not server.unauthenticated)
