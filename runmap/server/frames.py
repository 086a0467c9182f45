"""Calls as binary frames on a connection that switched to them: the lean path of a map's calls.

A call over HTTP costs the servlet a request's parsing, a response cycle and the
ASGI app (tens of microseconds of CPU each, which on a trivial call are most of
its cost). A client that makes many calls on one connection therefore asks,
once, to switch it to frames (the wire format: runmap/transport/framing.py):
an HTTP/1.1 upgrade request that carries the token, answered with ``101`` by
:mod:`runmap.server.http`, which then hands the connection to
:class:`FrameProtocol`.

A connection carries several calls at once (the Mapper keeps up to its
``concurrency`` in flight on one connection per replica): each runs as it
would over HTTP, on the loop or in a thread, and is answered when it ends,
with its call id. Answers to the frames of one read go out in one write.

The security of HTTP requests holds: only a request that presented the token
switches a connection, every frame carries the token again (checked before
its body is read), the lengths in a header are bounded before anything is
buffered for them, and the body is bounded by the servlet's body limit. A
frame that breaks a rule is answered with its status and the connection is closed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import TYPE_CHECKING, Any

from runmap.transport.framing import IN_THREAD, MAX_NAMES, MAX_TOKEN, REQUEST, RESPONSE, UPGRADE, VERSION

if TYPE_CHECKING:
    from runmap.server.app import ServletApp

SMALL_RESPONSE = 64 << 10  # up to this, header and body go out in one write


class FrameProtocol(asyncio.Protocol):
    """Serves call frames on one connection, which an authenticated upgrade handed over.

    Args:
        app: the servlet's app, which runs the calls.
        token: the servlet's token, which every frame must carry.
        max_body: the largest body a frame may have, in bytes.
    """

    def __init__(self, app: ServletApp, token: bytes, max_body: int) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] | None = None  # answers gathered while serving one read, written together

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._out = []
        try:
            self._serve()
        finally:
            self._flush()
            self._out = None

    def _serve(self) -> None:
        buf = self._buf
        while self.transport is not None and len(buf) >= REQUEST.size:
            version, flags, token_len, module_len, method_len, call_id, body_len = REQUEST.unpack_from(buf)
            if version != VERSION or token_len > MAX_TOKEN or module_len + method_len > MAX_NAMES:
                self._refuse(call_id, 400, "malformed call frame")
                return
            start = REQUEST.size + token_len
            if len(buf) < start:
                return
            if not hmac.compare_digest(bytes(buf[REQUEST.size : start]), self.token):
                self._refuse(call_id, 401, "missing or wrong token")
                return
            if body_len > self.max_body:
                self._refuse(call_id, 413, f"body of {body_len} bytes is over the limit of {self.max_body}")
                return
            names_end = start + module_len + method_len
            end = names_end + body_len
            if len(buf) < end:
                return
            try:
                module = buf[start : start + module_len].decode()
                method = buf[start + module_len : names_end].decode()
            except UnicodeDecodeError:
                self._refuse(call_id, 400, "call frame names are not UTF-8")
                return
            body = bytes(memoryview(buf)[names_end:end])
            del buf[:end]
            self._call(call_id, module, method, body, bool(flags & IN_THREAD))

    def _call(self, call_id: int, module: str, method: str, body: bytes, in_thread: bool) -> None:
        app = self.app
        if not in_thread and app.runs_inline(module, method, body):
            try:
                result = app.call_inline(module, method, body)
            except Exception as exc:
                self._answer_error(call_id, exc)
            else:
                self._answer(call_id, 200, result)
            return
        task = asyncio.ensure_future(app.call_in_thread(module, method, body))
        task.add_done_callback(lambda t: self._call_done(call_id, t))

    def _call_done(self, call_id: int, task: asyncio.Future[bytes]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._answer(call_id, 200, task.result())
        elif isinstance(exc, Exception):
            self._answer_error(call_id, exc)

    def _answer_error(self, call_id: int, exc: Exception) -> None:
        from runmap.server.app import error_detail

        status, detail = error_detail(exc)
        self._answer(call_id, status, json.dumps(detail).encode())

    def _answer(self, call_id: int, status: int, body: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client left: nobody waits for this answer
        head = RESPONSE.pack(call_id, status, len(body))
        if self._out is not None and len(body) <= SMALL_RESPONSE:
            self._out.append(head + body)  # written with the other answers to this read
        elif len(body) <= SMALL_RESPONSE:
            transport.write(head + body)
        else:
            self._flush()
            transport.writelines((head, body))

    def _flush(self) -> None:
        """Writes the answers gathered so far, in one write."""
        out = self._out
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if out:
            out.clear()

    def _refuse(self, call_id: int, status: int, detail: str) -> None:
        self._answer(call_id, status, json.dumps({"detail": detail}).encode())
        self._flush()
        self._buf = bytearray()
        if self.transport is not None:
            self.transport.close()


def upgrade_response() -> bytes:
    return b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: %s\r\n\r\n" % UPGRADE


def frame_server(app: Any) -> tuple[ServletApp, int] | None:
    """The servlet app and body limit behind ``app`` (``build_app``'s middleware), if it serves frames."""
    inner = getattr(app, "app", None)
    limit = getattr(app, "max_body", None)
    if inner is None or not hasattr(inner, "call_inline") or not isinstance(limit, int):
        return None
    return inner, limit
