"""Call frames (runmap/server/frames.py): the channel's lean path, and the rules every frame keeps.

Real servlet processes, real sockets: only a connection that presented the token
switches to frames, every frame carries the token again, and a frame that breaks
a rule (wrong token, a body over the limit, a malformed header) is refused and
its connection closed, while the servlet goes on answering.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import runmap as rm
from runmap.exceptions import ProtocolError
from runmap.servlet import Servlet
from runmap.transport import framing
from runmap.transport.http import HTTPChannel

MAX_BODY = 4096


class Echo:
    def echo(self, x: object) -> object:
        return x


@pytest.fixture
def cluster() -> Iterator[rm.LocalCluster]:
    with rm.LocalCluster(name="frames-test", max_body=MAX_BODY) as c:
        yield c


def _upgraded(servlet: Servlet, token: str | None = None, extra: str = "") -> socket.socket:
    sock = socket.create_connection(servlet.endpoint.address, timeout=10)  # type: ignore[arg-type]
    auth = f"Authorization: Bearer {token or servlet.endpoint.token}\r\n"
    sock.sendall(
        f"GET /frames HTTP/1.1\r\nHost: x\r\n{auth}{extra}Connection: Upgrade\r\n"
        f"Upgrade: {framing.UPGRADE.decode()}\r\nContent-Length: 0\r\n\r\n".encode()
    )
    return sock


def _exchange(
    servlet: Servlet,
    frames: bytes,
    answers: int,
    concurrency: int,
    then: tuple[Callable[[], None], bytes] | None = None,
) -> list[tuple[int, int, bytes]]:
    """Sends ``frames`` in one write on a connection of that concurrency; the first ``answers`` answers.

    ``then``: a wait, and frames sent in a second write once it returned.
    """
    sock = _upgraded(servlet, extra=f"Runmap-Concurrency: {concurrency}\r\n")
    try:
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
        sock.sendall(frames)
        if then is not None:
            wait, more = then
            wait()
            sock.sendall(more)
        reader, answered = framing.ResponseReader(), []
        while len(answered) < answers:
            n = sock.recv_into(reader.buffer())
            assert n, "the servlet closed the connection"
            answered += reader.received(n)
        return answered
    finally:
        sock.close()


def _read_until_closed(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def _frame_response(data: bytes, call_id: int = 0) -> tuple[int, bytes]:
    got_id, status, length = framing.RESPONSE.unpack_from(data)
    assert got_id == call_id
    return status, data[framing.RESPONSE.size : framing.RESPONSE.size + length]


def test_calls_travel_as_frames_and_fail_as_over_http(cluster: rm.LocalCluster) -> None:
    echo = rm.module(Echo).to(cluster)()
    servlet = echo.servlet
    channel = HTTPChannel(servlet.endpoint)
    try:
        assert [echo.echo(i) for i in range(3)] == [0, 1, 2]
        from runmap import serialization as ser

        payload = ser.dump_call(ser.SINGLE, ["x"], None)
        for in_thread in (False, True):
            outcome = ser.load_outcome(channel.call(echo.module_name, "echo", payload, 5.0, in_thread))
            assert outcome.results == ["x"]
            assert channel._framed
        with pytest.raises(ProtocolError, match="no module"):
            channel.call("no-such-module", "echo", payload)
        # HTTP requests still work on the same channel (a connection of their own), and calls after them.
        assert channel.info()["name"] == servlet.name
        assert ser.load_outcome(channel.call(echo.module_name, "echo", payload)).results == ["x"]
    finally:
        channel.close()


def test_only_the_token_switches_a_connection(cluster: rm.LocalCluster) -> None:
    servlet = rm.module(Echo).to(cluster)().servlet
    sock = _upgraded(servlet, token="not-the-token")
    try:
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 401 "), reply
    finally:
        sock.close()
    sock = _upgraded(servlet)
    try:
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 101 "), reply
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("frame", "status"),
    [
        (framing.request_head(b"wrong", b"m", b"echo", 3) + b"abc", 401),
        (framing.REQUEST.pack(1, 0, 0, 0, 0, 0, 0), 400),
        (framing.REQUEST.pack(framing.VERSION, 0, framing.MAX_TOKEN + 1, 0, 0, 0, 0), 400),
    ],
    ids=["wrong token", "version 1", "token length over the bound"],
)
def test_a_frame_that_breaks_a_rule_is_refused_and_closed(cluster: rm.LocalCluster, frame: bytes, status: int) -> None:
    echo = rm.module(Echo).to(cluster)()
    sock = _upgraded(echo.servlet)
    try:
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
        sock.sendall(frame)
        got, detail = _frame_response(_read_until_closed(sock))
        assert got == status and "detail" in json.loads(detail)
    finally:
        sock.close()
    assert echo.echo(7) == 7  # the servlet goes on


def test_a_body_over_the_limit_is_refused_before_it_is_read(cluster: rm.LocalCluster) -> None:
    echo = rm.module(Echo).to(cluster)()
    sock = _upgraded(echo.servlet)
    token = echo.servlet.endpoint.token.encode()
    try:
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
        sock.sendall(framing.request_head(token, echo.module_name.encode(), b"echo", 1 << 40))  # no body sent
        got, detail = _frame_response(_read_until_closed(sock))
        assert got == 413 and "over the limit" in json.loads(detail)["detail"]
    finally:
        sock.close()
    assert echo.echo(8) == 8


class Sleeper:
    def nap(self, seconds: float) -> float:
        import time

        time.sleep(seconds)
        return seconds


def test_calls_on_one_connection_run_at_once_and_are_answered_as_they_end(cluster: rm.LocalCluster) -> None:
    from runmap import serialization as ser

    sleeper = rm.module(Sleeper).to(cluster)()
    sock = _upgraded(sleeper.servlet)
    token = sleeper.servlet.endpoint.token.encode()
    try:
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
        naps = {7: 1.0, 8: 0.5, 9: 0.0}  # call id -> seconds: sent slowest first
        for call_id, seconds in naps.items():
            body = ser.dump_call(ser.SINGLE, [seconds], None)
            module = sleeper.module_name.encode()
            head = framing.request_head(token, module, b"nap", len(body), framing.IN_THREAD, call_id)
            sock.sendall(head + body)
        reader, answered = framing.ResponseReader(), []
        while len(answered) < len(naps):
            n = sock.recv_into(reader.buffer())
            assert n, "the servlet closed the connection"
            answered += reader.received(n)
        assert [call_id for call_id, _, _ in answered] == [9, 8, 7]  # the shortest first: none waited for another
        assert all(status == 200 for _, status, _ in answered)
        assert [ser.load_outcome(body).results[0] for _, _, body in answered] == [0.0, 0.5, 1.0]
    finally:
        sock.close()


class Clock:
    def span(self, seconds: float) -> tuple[float, float]:
        import time

        start = time.monotonic()  # one clock for every process of this machine
        time.sleep(seconds)
        return start, time.monotonic()


def test_a_connection_runs_at_most_its_concurrency_and_queues_the_rest_in_order(cluster: rm.LocalCluster) -> None:
    """The Mapper sends short calls beyond its concurrency (mapper/dispatch.py): the servlet holds them back."""
    from runmap import serialization as ser

    clock = rm.module(Clock).to(cluster)()
    token = clock.servlet.endpoint.token.encode()
    frames = b""
    for call_id in range(1, 6):  # five calls in one write: the servlet reads them at once
        body = ser.dump_call(ser.SINGLE, [0.3], None)
        head = framing.request_head(token, clock.module_name.encode(), b"span", len(body), 0, call_id)
        frames += head + body
    answered = _exchange(clock.servlet, frames, answers=5, concurrency=2)
    assert all(status == 200 for _, status, _ in answered)
    spans = {call_id: ser.load_outcome(body).results[0] for call_id, _, body in answered}
    starts = [spans[call_id][0] for call_id in range(1, 6)]
    assert starts == sorted(starts), "the queued calls start in the order they came"
    most = max(sum(1 for s, e in spans.values() if s <= start < e) for start in starts)
    assert most == 2, spans


class Recorder:
    def __init__(self) -> None:
        self.ran: list[int] = []

    def run(self, tag: int, seconds: float) -> int:
        import time

        self.ran.append(tag)
        time.sleep(seconds)
        return tag

    def seen(self) -> list[int]:
        return self.ran


def _recorded_calls(recorder: Any, token: bytes, calls: tuple[tuple[int, float], ...]) -> bytes:
    from runmap import serialization as ser

    frames = b""
    for call_id, seconds in calls:
        body = ser.dump_call(ser.STAR, [(call_id, seconds)], None)
        head = framing.request_head(token, recorder.module_name.encode(), b"run", len(body), framing.IN_THREAD, call_id)
        frames += head + body
    return frames


def test_a_queued_call_taken_back_never_runs_and_a_started_one_is_kept(cluster: rm.LocalCluster) -> None:
    """The Mapper takes queued calls back from a replica when another runs dry (mapper/dispatch.py)."""
    from runmap import serialization as ser

    recorder = rm.module(Recorder).to(cluster)()
    token = recorder.servlet.endpoint.token.encode()
    frames = _recorded_calls(recorder, token, ((1, 0.3), (2, 0.0), (3, 0.0)))  # 1 runs in a thread, 2 and 3 queue

    def started() -> None:
        deadline = time.monotonic() + 10
        while 1 not in recorder.seen():
            assert time.monotonic() < deadline, "call 1 never started"

    withdrawals = framing.withdraw_frame(token, 3) + framing.withdraw_frame(token, 1) + framing.withdraw_frame(token, 9)
    answered = _exchange(recorder.servlet, frames, answers=5, concurrency=1, then=(started, withdrawals))
    statuses = [(call_id, status) for call_id, status, _ in answered]
    assert [ser.load_outcome(body).results for _, status, body in answered if status == 200] == [[1], [2]]
    assert statuses == [(3, framing.WITHDRAWN), (1, framing.KEPT), (9, framing.KEPT), (1, 200), (2, 200)]
    assert recorder.seen() == [1, 2]  # 3 never ran


def test_a_withdrawal_read_with_its_call_wins_even_when_there_was_room(cluster: rm.LocalCluster) -> None:
    """A call and its withdrawal in one read: the call never starts (the servlet parses a read before it runs any)."""
    recorder = rm.module(Recorder).to(cluster)()
    token = recorder.servlet.endpoint.token.encode()
    frames = _recorded_calls(recorder, token, ((1, 0.0), (2, 0.0))) + framing.withdraw_frame(token, 1)
    answered = _exchange(recorder.servlet, frames, answers=2, concurrency=1)
    assert [(call_id, status) for call_id, status, _ in answered] == [(1, framing.WITHDRAWN), (2, 200)]
    assert recorder.seen() == [2]


@pytest.mark.parametrize("names, body", [(b"m", 0), (b"", 5)])
def test_a_withdrawal_with_names_or_a_body_is_refused(cluster: rm.LocalCluster, names: bytes, body: int) -> None:
    echo = rm.module(Echo).to(cluster)()
    token = echo.servlet.endpoint.token.encode()
    sock = _upgraded(echo.servlet)
    try:
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
        head = framing.REQUEST.pack(framing.VERSION, framing.WITHDRAW, len(token), len(names), 0, 4, body)
        sock.sendall(head + token + names + b"x" * body)
        assert _frame_response(_read_until_closed(sock), call_id=4)[0] == 400
    finally:
        sock.close()
    assert echo.echo(1) == 1  # the servlet goes on
