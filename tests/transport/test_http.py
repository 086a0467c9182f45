"""The HTTP channel and the wire format: large payloads, reuse, errors."""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import stat

import pytest

import runmap as rm
from runmap import serialization as ser
from runmap.exceptions import ReplicaDiedError
from runmap.transport.http import HTTPChannel

TEN_MB = 10 << 20


def echo(x):  # type: ignore[no-untyped-def]
    return x


def size_and_tail(x: bytes, y: bytearray) -> tuple[int, int, bytes, bytes]:
    return len(x), len(y), x[-3:], bytes(y[-3:])


class Store:
    def __init__(self) -> None:
        self.blob = b""

    def put(self, blob: bytes) -> int:
        self.blob = blob
        return len(blob)

    def get(self) -> bytes:
        return self.blob


def _blob(n: int, seed: int = 7) -> bytes:
    return bytes((i * seed) & 0xFF for i in range(256)) * (n // 256)


def test_a_10_mb_argument_and_result_arrive_intact(cluster: rm.LocalCluster) -> None:
    remote_echo = rm.function(echo).to(cluster)
    blob = _blob(TEN_MB)
    back = remote_echo(blob)
    assert type(back) is bytes
    assert back == blob


def test_large_payloads_keep_their_types_in_a_map(cluster: rm.LocalCluster) -> None:
    blob, arr = _blob(TEN_MB, 3), bytearray(_blob(1 << 20, 5))
    with rm.mapper(rm.function(size_and_tail).to(cluster)) as mapper:
        (out,) = mapper.map([blob], [arr], progress=False)
        assert out == (TEN_MB, 1 << 20, blob[-3:], bytes(arr[-3:]))
        results = mapper.map([blob, b"small", blob], [arr, bytearray(b"ab"), arr], progress=False)
        assert [r[0] for r in results] == [TEN_MB, 5, TEN_MB]


def test_a_remote_instance_keeps_a_large_value(cluster: rm.LocalCluster) -> None:
    store = rm.module(Store).to(cluster)()
    blob = _blob(3 << 20)
    assert store.put(blob) == len(blob)
    assert store.get() == blob
    assert store.get() == blob  # the same connection, reused after a large response


def test_large_values_travel_out_of_band() -> None:
    blob = _blob(ser.OUT_OF_BAND_MIN)
    frame = ser.dump_call(ser.SINGLE, [blob, 1], None)
    assert frame[:4] == ser.FRAME_MAGIC
    assert len(frame) < len(blob) + 1024
    mode, items, kwargs = ser.load_call(bytearray(frame))  # the channel hands over a bytearray
    assert (mode, items[1], kwargs) == (ser.SINGLE, 1, None)
    assert type(items[0]) is bytes and items[0] == blob

    outcome = ser.load_outcome(memoryview(ser.dump_outcome(ser.Outcome([blob, None]))))
    assert outcome.results == [blob, None]


def test_small_values_stay_plain_pickles() -> None:
    frame = ser.dump_call(ser.SINGLE, [b"x" * 100, 2], None)
    assert frame[:2] == b"\x80\x05"
    assert ser.load_call(frame) == (ser.SINGLE, [b"x" * 100, 2], None)


def test_a_truncated_frame_is_refused() -> None:
    frame = ser.dump_call(ser.SINGLE, [_blob(ser.OUT_OF_BAND_MIN)], None)
    with pytest.raises(pickle.UnpicklingError):
        ser.load_call(frame[:-10])


def test_the_channel_reconnects_after_the_servlet_dropped_an_idle_connection(cluster: rm.LocalCluster) -> None:
    remote_echo = rm.function(echo).to(cluster)
    servlet = remote_echo.servlet
    channel = HTTPChannel(servlet.endpoint)
    try:
        payload = ser.dump_call(ser.STAR, [(41,)], None)
        assert ser.load_outcome(channel.call(remote_echo.module_name, None, payload)).results == [41]
        assert channel._sock is not None
        channel._sock.shutdown(socket.SHUT_RDWR)  # as if the idle connection had been closed under us
        assert ser.load_outcome(channel.call(remote_echo.module_name, None, payload)).results == [41]
    finally:
        channel.close()


def test_errors_come_back_as_runmap_errors(cluster: rm.LocalCluster) -> None:
    remote_echo = rm.function(echo).to(cluster)
    servlet = remote_echo.servlet
    channel = HTTPChannel(servlet.endpoint)
    try:
        with pytest.raises(rm.ProtocolError) as info:
            channel.call("no-such-module", None, ser.dump_call(ser.STAR, [()], None))
        assert info.value.status == 404
        with pytest.raises(rm.SerializationError):
            channel.call(remote_echo.module_name, None, b"\x80\x05garbage")
        # The connection is still good after a refused request.
        payload = ser.dump_call(ser.STAR, [("ok",)], None)
        assert ser.load_outcome(channel.call(remote_echo.module_name, None, payload)).results == ["ok"]
    finally:
        channel.close()


# ------------------------------------------------------- the local servlets' Unix socket


def _peer_family(channel: HTTPChannel) -> socket.AddressFamily:
    sock = channel._connect()
    try:
        return sock.family
    finally:
        sock.close()


def test_a_local_servlet_is_reached_on_its_unix_socket_and_it_asks_for_the_token(cluster: rm.LocalCluster) -> None:
    remote = rm.function(echo).to(cluster)
    endpoint = remote.servlet.endpoint
    assert endpoint.local and endpoint.local not in repr(endpoint.describe())
    channel = HTTPChannel(endpoint)
    try:
        assert _peer_family(channel) == socket.AF_UNIX
        assert channel.info()["name"] == remote.servlet.name
    finally:
        channel.close()
    directory = os.stat(os.path.dirname(endpoint.local))  # the user's private runtime directory
    assert directory.st_uid == os.getuid() and stat.S_IMODE(directory.st_mode) == 0o700
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # as any process of this user may
        sock.settimeout(10)
        sock.connect(endpoint.local)
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")


def test_a_loopback_servlet_whose_unix_socket_is_gone_is_gone_and_its_port_is_not_tried(
    cluster: rm.LocalCluster,
) -> None:
    # The socket file and loopback are this machine's: nothing listening on the file means no servlet,
    # and whoever may hold its port now must not get the request.
    servlet = rm.function(echo).to(cluster).servlet
    channel = HTTPChannel(dataclasses.replace(servlet.endpoint, local="/nowhere/runmap.sock"))
    try:
        with pytest.raises(ReplicaDiedError, match="nothing listens on its socket /nowhere/runmap.sock"):
            channel.info()
    finally:
        channel.close()


def _an_address_not_on_loopback() -> str:
    import psutil

    found = [a.address for name, addrs in psutil.net_if_addrs().items() for a in addrs
             if a.family == socket.AF_INET and not a.address.startswith("127.")]  # fmt: skip
    assert found, "this test needs a network interface other than loopback"
    return found[0]


def test_a_servlet_told_to_listen_beyond_loopback_is_reached_on_its_address_where_its_name_is_not() -> None:
    # Another machine than the servlet's (here: a name that is nowhere) reaches it by its address.
    with rm.LocalCluster(name="wide", host=_an_address_not_on_loopback()) as wide:
        servlet = rm.function(echo).to(wide).servlet
        channel = HTTPChannel(dataclasses.replace(servlet.endpoint, local="/nowhere/runmap.sock"))
        try:
            assert _peer_family(channel) == socket.AF_INET
            assert channel.info()["name"] == servlet.name
        finally:
            channel.close()


def test_a_runtime_directory_too_deep_for_a_socket_leaves_a_local_servlet_on_its_port(
    tmp_path, monkeypatch, capfd  # type: ignore[no-untyped-def]
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("RUNMAP_HOME", str(deep))
    with rm.LocalCluster(name="deep") as deep_cluster:
        said = capfd.readouterr().err
        assert "is over 107 bytes: set RUNMAP_HOME to a shorter directory; local servlets listen on TCP only" in said
        remote = rm.function(echo).to(deep_cluster)
        assert remote.servlet.endpoint.local is None
        assert remote("x") == "x"
    assert not list((deep / "servlets").iterdir())  # none was made
