"""The HTTP channel: one kept-alive ``http.client`` connection to a servlet.

``http.client`` rather than httpx: on this path the client library is the
largest cost of a small call (BASELINES.md: 116 µs of client CPU a request
against httpx's 415), and a channel is used by one thread at a time anyway.
All socket and ``http.client`` errors are translated here, and only here, into
runmap's exceptions.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from typing import Any, Iterator
from urllib.parse import quote

from runmap.exceptions import (
    AuthError,
    ProtocolError,
    ReplicaDiedError,
    ReplicaTimeoutError,
    SerializationError,
)

CONNECT_TIMEOUT = 10.0
_DISCONNECTS = (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead, http.client.BadStatusLine)


class HTTPChannel:
    """A channel to the servlet at ``host:port``; ``replica`` names it in errors."""

    def __init__(self, host: str, port: int, token: str, replica: str) -> None:
        self.host = host
        self.port = port
        self.replica = replica
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False

    # ------------------------------------------------------------ interface

    def put_module(self, name: str, payload: bytes) -> bytes:
        return self._request("PUT", f"/modules/{quote(name, safe='')}", payload, None)

    def delete_module(self, name: str) -> None:
        self._request("DELETE", f"/modules/{quote(name, safe='')}", b"", None)

    def call(self, module: str, method: str | None, payload: bytes, timeout: float | None = None) -> bytes:
        path = f"/call/{quote(module, safe='')}/{quote(method or '__call__', safe='')}"
        return self._request("POST", path, payload, timeout)

    def info(self) -> dict[str, Any]:
        return json.loads(self._request("GET", "/info", b"", None))  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def abort(self) -> None:
        self._aborted = True
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                # shutdown, not close: it wakes a thread blocked reading this socket.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------ internals

    def _connect(self) -> http.client.HTTPConnection:
        if self._aborted:
            raise ReplicaDiedError(f"the channel to {self.replica} was aborted", self.replica)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT)
        with self._translate(None):
            conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _request(self, method: str, path: str, body: bytes, timeout: float | None) -> bytes:
        reused = self._conn is not None
        if self._conn is None:
            self._conn = self._connect()
        try:
            return self._exchange(self._conn, method, path, body, timeout)
        except ReplicaDiedError:
            self.close()
            # A kept-alive connection can be closed under us (a servlet restart, an
            # idle timeout in a proxy). Try once more on a fresh connection: if the
            # servlet is really gone, that connect fails at once.
            if not reused or self._aborted:
                raise
            self._conn = self._connect()
            return self._exchange(self._conn, method, path, body, timeout)
        except BaseException:
            # A timeout or an interrupt leaves the connection mid-response: never reuse it.
            self.close()
            raise

    def _exchange(
        self, conn: http.client.HTTPConnection, method: str, path: str, body: bytes, timeout: float | None
    ) -> bytes:
        with self._translate(timeout):
            assert conn.sock is not None
            conn.sock.settimeout(timeout)
            conn.request(method, path, body=body, headers=self._headers)
            response = conn.getresponse()
            data = response.read()
        if response.status in (200, 204):
            return data
        self._raise_for_status(response.status, data)
        raise AssertionError("unreachable")

    def _raise_for_status(self, status: int, data: bytes) -> None:
        try:
            detail = json.loads(data)
        except ValueError:
            detail = {"detail": data[:200].decode("utf-8", "replace")}
        message = f"{self.replica}: {detail.get('detail', detail)}"
        if status == 401:
            raise AuthError(f"{self.replica} refused the token (401)")
        if status == 422:
            raise SerializationError(message, side=detail.get("side"), replica=self.replica)
        raise ProtocolError(f"{message} (HTTP {status})", status)

    @contextlib.contextmanager
    def _translate(self, timeout: float | None) -> Iterator[None]:
        try:
            yield
        except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
            if timeout is None:
                raise ReplicaDiedError(
                    f"{self.replica} at {self.host}:{self.port} did not answer within {CONNECT_TIMEOUT:g} s",
                    self.replica,
                ) from exc
            raise ReplicaTimeoutError(
                f"a call on {self.replica} did not finish within its timeout of {timeout:g} s", self.replica
            ) from exc
        except (*_DISCONNECTS, OSError) as exc:
            raise ReplicaDiedError(
                f"{self.replica} at {self.host}:{self.port} is unreachable: {exc!r}", self.replica
            ) from exc
