"""What a client without the token can make a servlet spend, before the token is checked.

Real servlet processes and real sockets: an oversized request head, a head that
never ends (slowloris), and hundreds of idle connections. After each attack the
servlet must still answer a real call.
"""

from __future__ import annotations

import http.client
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

import runmap as rm
from runmap.server.http import HEAD_TIMEOUT_ENV, MAX_HEAD_BYTES, MAX_HEADERS, MAX_UNAUTHENTICATED

HEAD_TIMEOUT = 1.0  # the fast servlet's head timeout, set through its environment
CLOSE_SLACK = 4.0  # how much later than its timeout the servlet may close a connection
BIG_HEADER = 10 << 20
RSS_GROWTH_LIMIT = 16 << 20


@dataclass
class Servlet:
    host: str
    port: int
    pid: int
    token: str
    call: Any  # rm.function(len) placed on this servlet
    cluster: rm.LocalCluster
    env: Any


def _address(servlet: Any) -> tuple[str, int]:
    endpoint = getattr(servlet, "endpoint", None)
    if endpoint is not None:
        host, port = endpoint.address
        return host, port
    return servlet.host, servlet.port


@pytest.fixture(scope="module")
def servlets() -> Iterator[dict[str, Servlet]]:
    """Two servlets: one with a 1 s head timeout ("fast"), one with the defaults ("default")."""
    with rm.LocalCluster(name="bounds") as cluster:
        envs = {"fast": rm.env(name="fast", env_vars={HEAD_TIMEOUT_ENV: str(HEAD_TIMEOUT)}), "default": rm.env()}
        calls = {name: rm.function(len).to(cluster, env=env) for name, env in envs.items()}
        found = {}
        for s in cluster.servlets:
            name = "fast" if s.name == "fast" else "default"
            assert s.pid is not None
            host, port = _address(s)
            found[name] = Servlet(host, port, s.pid, s.endpoint.token, calls[name], cluster, envs[name])
        assert set(found) == {"fast", "default"}
        yield found


@pytest.fixture
def fast(servlets: dict[str, Servlet]) -> Servlet:
    return servlets["fast"]


@pytest.fixture
def default(servlets: dict[str, Servlet]) -> Servlet:
    return servlets["default"]


def _connect(s: Servlet) -> socket.socket:
    return socket.create_connection((s.host, s.port), timeout=10)


def _wait_closed(sock: socket.socket, within: float) -> bytes:
    """Reads until the servlet closes the connection; what it sent. Fails if it is still open after ``within`` s."""
    deadline = time.monotonic() + within
    got = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the servlet kept the connection open for {within:g} s (it sent {got[:80]!r})")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        except TimeoutError:
            continue
        if not chunk:
            return got
        got += chunk


def _is_closed(sock: socket.socket) -> bool:
    """Whether the servlet has closed ``sock`` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(10)


def _still_works(s: Servlet) -> None:
    """The servlet answers a real call and an open ``/health``."""
    assert psutil.pid_exists(s.pid)
    assert s.call("four") == 4
    conn = http.client.HTTPConnection(s.host, s.port, timeout=10)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    finally:
        conn.close()


def _request(sock: socket.socket, path: str, token: str | None = None) -> int:
    """Sends ``GET path`` on ``sock`` (kept alive) and reads the response; its status."""
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        assert chunk, "the servlet closed the connection"
        head += chunk
    head, _, body = head.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the servlet closed the connection mid-response"
        body += chunk
    return int(lines[0].split()[1])


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


# ------------------------------------------------------------------ the size of a request head


def test_a_huge_header_line_is_refused_before_it_grows_the_servlet(default: Servlet) -> None:
    proc = psutil.Process(default.pid)
    before = proc.memory_info().rss
    socks: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = _connect(default)
            socks.append(sock)
            try:
                sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\nX-Big: ")
                sock.sendall(b"a" * BIG_HEADER)  # without a limit the servlet reads (and keeps) all of it
            except OSError:
                pass  # the servlet closed the connection under the send: what it should do
        grown = proc.memory_info().rss - before
        for sock in socks:
            reply = _wait_closed(sock, within=5)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 431 "), reply[:80]
    finally:
        _close_all(socks)
    assert grown < RSS_GROWTH_LIMIT, f"the servlet grew by {grown >> 20} MiB"
    _still_works(default)


def test_a_head_over_the_limit_gets_431(default: Servlet) -> None:
    head = b"GET /info HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    with _connect(default) as sock:
        sock.sendall(head)
        reply = _wait_closed(sock, within=5)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
    _still_works(default)


def test_too_many_headers_get_431(default: Servlet) -> None:
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
    with _connect(default) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        reply = _wait_closed(sock, within=5)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
    _still_works(default)


def test_heads_within_the_limits_and_large_bodies_still_pass(default: Servlet) -> None:
    # Near the limits, with the token: answered as before.
    filler = b"X-Fill: " + b"a" * (MAX_HEAD_BYTES - 4096) + b"\r\n"
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(MAX_HEADERS - 3))
    auth = f"Authorization: Bearer {default.token}\r\n".encode()
    with _connect(default) as sock:
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\n" + auth + headers + filler + b"\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk
            head += chunk
    assert head.startswith(b"HTTP/1.1 200 "), head[:80]
    # A body far over the head limit, in the same reads as its head, is a body.
    assert default.call(b"x" * (MAX_HEAD_BYTES * 20)) == MAX_HEAD_BYTES * 20
    assert default.call(b"y" * (MAX_HEAD_BYTES - 100)) == MAX_HEAD_BYTES - 100
    _still_works(default)


# ------------------------------------------------------------------ the time a request head may take


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(fast: Servlet) -> None:
    with _connect(fast) as sock:
        start = time.monotonic()
        assert _wait_closed(sock, within=HEAD_TIMEOUT + CLOSE_SLACK) == b""
        elapsed = time.monotonic() - start
    assert elapsed >= HEAD_TIMEOUT / 2, f"closed after {elapsed:.2f} s, before its head timeout"
    _still_works(fast)


def test_a_head_sent_a_byte_at_a_time_is_cut_off(fast: Servlet) -> None:
    with _connect(fast) as sock:
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        deadline = time.monotonic() + HEAD_TIMEOUT + CLOSE_SLACK
        closed = False
        while not closed and time.monotonic() < deadline:
            sock.settimeout(0.1)  # one byte every 0.1 s, while watching for the close
            try:
                closed = sock.recv(65536) == b""
            except TimeoutError:
                try:
                    sock.sendall(b"a")
                except OSError:
                    closed = True
            except ConnectionResetError:
                closed = True
        assert closed, "a head trickling in kept its connection open"
    _still_works(fast)


def test_a_kept_alive_connection_that_starts_a_head_is_cut_off(fast: Servlet) -> None:
    # The keep-alive timer ends at the first byte of the next request, complete or not (a bare CRLF
    # starts no request at all): without the token, the next request has the head timeout to arrive.
    with _connect(fast) as sock:
        assert _request(sock, "/health") == 200
        sock.sendall(b"\r\n")
        _wait_closed(sock, within=HEAD_TIMEOUT + CLOSE_SLACK)
    with _connect(fast) as sock:
        assert _request(sock, "/health") == 200
        sock.sendall(b"GET /hea")
        _wait_closed(sock, within=HEAD_TIMEOUT + CLOSE_SLACK)
    _still_works(fast)


def test_a_call_or_a_pause_longer_than_the_head_timeout_is_not_cut(fast: Servlet) -> None:
    sleep = rm.function(time.sleep).to(fast.cluster, env=fast.env)
    assert sleep(HEAD_TIMEOUT * 2) is None
    with _connect(fast) as sock:
        assert _request(sock, "/info", fast.token) == 200
        # Kept alive and idle for longer than the head timeout (not than the keep-alive timeout): still open.
        until = time.monotonic() + HEAD_TIMEOUT * 2
        sock.settimeout(0.1)
        while time.monotonic() < until:
            try:
                peeked = sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                continue
            pytest.fail(f"the servlet closed an authenticated kept-alive connection (read {peeked!r})")
        sock.settimeout(10)
        assert _request(sock, "/info", fast.token) == 200
    _still_works(fast)


# ------------------------------------------------------------------ how many connections may wait for a token


def test_idle_unauthenticated_connections_are_bounded(default: Servlet) -> None:
    extra = 44
    socks: list[socket.socket] = []
    try:
        own = _connect(default)
        socks.append(own)
        assert _request(own, "/info", default.token) == 200  # the client's own connection: authenticated
        idle = [_connect(default) for _ in range(MAX_UNAUTHENTICATED + extra)]
        socks.extend(idle)
        deadline = time.monotonic() + 5
        while sum(_is_closed(s) for s in idle) < extra:
            assert time.monotonic() < deadline, (
                f"{sum(not _is_closed(s) for s in idle)} idle unauthenticated connections still open"
            )
            time.sleep(0.05)
        closed = [i for i, s in enumerate(idle) if _is_closed(s)]
        assert closed == list(range(extra)), closed  # the oldest went
        assert _request(own, "/info", default.token) == 200  # the client's own connection is left alone
        _still_works(default)
    finally:
        _close_all(socks)
    _still_works(default)


def test_the_servlet_may_use_all_the_descriptors_it_is_allowed(cluster: rm.LocalCluster) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = 512
    if hard != resource.RLIM_INFINITY and hard <= lowered:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        remote = rm.function(len).to(cluster)  # the servlet inherits the lowered soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    (servlet,) = cluster.servlets
    servlet_soft, servlet_hard = psutil.Process(servlet.pid).rlimit(psutil.RLIMIT_NOFILE)
    assert servlet_hard == hard
    assert servlet_soft > lowered
    assert remote("abc") == 3
