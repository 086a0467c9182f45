"""Fuzzing a real servlet: thousands of random requests, no crash, no 2xx without the token.

Two hypothesis runs of 5,000 requests each (unauthenticated, then with the
token and garbage bodies), and a table of malformed HTTP at the socket level.
After each run the servlet must still answer a real call.
"""

from __future__ import annotations

import http.client
import pickle
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runmap as rm
from runmap import serialization as ser

EXAMPLES = 5000
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
SEGMENT = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#%"), max_size=12)


def _paths(module: str) -> st.SearchStrategy[str]:
    known = st.sampled_from(
        ["/health", "/info", "/docs", "/openapi.json", f"/modules/{module}", f"/call/{module}/__call__",
         f"/call/{module}/__init__", f"/call/{module}/__reduce__", "/call/nope/x", "/modules/", "/call//", "/"]
    )
    random = st.lists(SEGMENT, min_size=0, max_size=4).map(lambda parts: "/" + "/".join(parts))
    return st.one_of(known, random)


def _bodies(module: str) -> st.SearchStrategy[bytes]:
    valid_call = ser.dump_call(ser.STAR, [("abc",)], None)
    return st.one_of(
        st.binary(max_size=256),
        st.just(valid_call),
        st.binary(min_size=1, max_size=len(valid_call) - 1).map(lambda b: valid_call[: len(b)]),  # truncated
        st.sampled_from([pickle.dumps(x) for x in (None, 1, "x", (1, 2), [1], {"a": 1}, (1, [], None))]),
        st.builds(
            lambda k, o: pickle.dumps((k, o, (), {})), st.sampled_from(["function", "class", "other"]), st.integers()
        ),
    )


@pytest.fixture(scope="module")
def servlet() -> Iterator[tuple[rm.LocalCluster, object, str]]:
    with rm.LocalCluster(name="fuzz") as cluster:
        remote = rm.function(len).to(cluster)
        yield cluster, cluster.servlets[0], remote.module_name


@pytest.fixture
def connection(servlet):  # type: ignore[no-untyped-def]
    _, s, _ = servlet
    holder = {"conn": http.client.HTTPConnection(*s.endpoint.address, timeout=10)}
    yield holder
    holder["conn"].close()


def _send(holder, method: str, path: str, headers: dict[str, str], body: bytes) -> int:  # type: ignore[no-untyped-def]
    conn = holder["conn"]
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        status = response.status
        if response.getheader("connection", "").lower() == "close":
            raise http.client.RemoteDisconnected()
        return status
    except (http.client.RemoteDisconnected, ConnectionError):
        conn.close()
        holder["conn"] = http.client.HTTPConnection(conn.host, conn.port, timeout=10)
        raise


def _still_works(servlet) -> None:  # type: ignore[no-untyped-def]
    _, s, module = servlet
    assert s.is_alive()
    channel = s.open_channel()
    try:
        outcome = ser.load_outcome(channel.call(module, None, ser.dump_call(ser.STAR, [("four",)], None)))
    finally:
        channel.close()
    assert outcome.results == [4]


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
    suppress_health_check=list(HealthCheck),
)


def test_without_the_token_nothing_but_health_succeeds(servlet, connection) -> None:  # type: ignore[no-untyped-def]
    _, s, module = servlet
    token = s.endpoint.token
    statuses: list[int] = []
    wrong_tokens = st.sampled_from([None, "", "Bearer", "Bearer ", "Bearer x", "bearer " + token,
                                    token, "Basic " + token, "Bearer " + token[:-1]])

    @FUZZ_SETTINGS
    @given(method=METHODS, path=_paths(module), auth=wrong_tokens, body=_bodies(module))
    def run(method: str, path: str, auth: str | None, body: bytes) -> None:
        headers = {} if auth is None else {"Authorization": auth}
        status = _send(connection, method, path, headers, body)
        statuses.append(status)
        if 200 <= status < 300:
            assert (method, path) in {("GET", "/health"), ("HEAD", "/health")}, (method, path, status)
        else:
            assert status < 500, (method, path, status)

    run()
    assert len(statuses) >= EXAMPLES
    assert statuses.count(401) > EXAMPLES // 2
    _still_works(servlet)


def test_with_the_token_garbage_gets_a_4xx(servlet, connection) -> None:  # type: ignore[no-untyped-def]
    _, s, module = servlet
    statuses: list[int] = []
    auth = {"Authorization": f"Bearer {s.endpoint.token}"}
    calls = st.sampled_from([f"/call/{module}/__call__", f"/call/{module}/__init__", f"/call/{module}/real"])

    @FUZZ_SETTINGS
    @given(
        method=st.sampled_from(["POST", "PUT", "GET", "DELETE"]),
        path=st.one_of(calls, _paths(module)),
        body=_bodies(module),
    )
    def run(method: str, path: str, body: bytes) -> None:
        if method in ("DELETE", "PUT") and path == f"/modules/{module}":
            path = "/modules/fuzzed"  # keep the module the other examples aim at
        status = _send(connection, method, path, auth, body)
        statuses.append(status)
        assert status < 500, (method, path, status, body[:40])

    run()
    assert len(statuses) >= EXAMPLES
    assert statuses.count(422) > 0 and statuses.count(404) > 0
    _still_works(servlet)


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"POST /call/x/__call__ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort",
    b"POST /call/x/__call__ HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /call/x/__call__ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /call/x/__call__ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /info HTTP/1.1\r\n" + b"X-Long: " + b"a" * 100_000 + b"\r\n\r\n",
    b"\x00\x01\x02\x03" * 100,
    b"GET / HTTP/9.9\r\n\r\n",
]


@pytest.mark.parametrize("raw", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_http_never_takes_it_down(servlet, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    _, s, _ = servlet
    with socket.create_connection(s.endpoint.address, timeout=5) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            reply = sock.recv(65536)
        except (ConnectionError, TimeoutError):
            reply = b""
    assert not reply.startswith(b"HTTP/1.1 2"), reply[:80]
    _still_works(servlet)


def test_a_body_over_the_limit_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with rm.LocalCluster(name="small", max_body=1024) as cluster:
        remote = rm.function(len).to(cluster)
        with pytest.raises(rm.ProtocolError, match="413"):
            remote(b"x" * 4096)
        assert remote(b"x" * 10) == 10
