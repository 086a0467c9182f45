"""Calls as binary frames on a connection that switched to them: the lean path of a map's calls.

A call over HTTP costs the servlet a request's parsing, a response cycle and the
ASGI app (tens of microseconds of CPU each, which on a trivial call are most of
its cost). A client that makes many calls on one connection therefore asks,
once, to switch it to frames (the wire format: runmap/transport/framing.py):
an HTTP/1.1 upgrade request that carries the token, answered with ``101`` by
:mod:`runmap.server.http`, which then hands the connection to
:class:`FrameProtocol`.

A connection carries several calls at once: each runs as it would over HTTP,
on the loop or in a thread, and is answered when it ends, with its call id.
Answers to the frames of one read go out in one write.

The upgrade request may name the connection's concurrency
(``Runmap-Concurrency: N``, the Mapper's ``concurrency``). The client may then
send more calls than that (it queues short calls here, so that the servlet
never waits a round trip for the next one), and the servlet keeps the rest
in a first-in, first-out backlog: at most N calls have started and not yet had
their answers written (an answer gathered for a write counts as running). So
when the servlet dies, the calls that may have run are the client's N oldest
unanswered ones: the others never started and are not charged with the death.
A client may take a queued call back (a withdrawal frame: another replica ran
dry and can start it sooner), and the servlet then answers it ``WITHDRAWN``
instead of ever running it.

The security of HTTP requests holds: only a request that presented the token
switches a connection, every frame carries the token again (checked before
its body is read), the lengths in a header are bounded before anything is
buffered for them, and the body is bounded by the servlet's body limit. A
frame that breaks a rule is answered with its status and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import TYPE_CHECKING, Any

from runmap.server.auth import compare_digest
from runmap.transport.framing import (
    IN_THREAD,
    KEPT,
    MAX_NAMES,
    MAX_TOKEN,
    REQUEST,
    RESPONSE,
    UPGRADE,
    VERSION,
    WITHDRAW,
    WITHDRAWN,
)

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

    def __init__(self, app: ServletApp, token: bytes, max_body: int, concurrency: int | None = None) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body
        self.concurrency = concurrency  # calls started and not yet answered, at most (None: no cap)
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []  # small answers gathered, written together by _flush
        self._threaded = 0  # calls of this connection running in threads
        self._backlog: deque[tuple[int, str, str, bytes, bool]] = deque()  # calls waiting for room

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._buf = bytearray()
        self._backlog.clear()
        self._out.clear()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            self._serve()
            self._start_backlog()
        finally:
            self._flush()

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
            if not compare_digest(bytes(buf[REQUEST.size : start]), self.token):
                self._refuse(call_id, 401, "missing or wrong token")
                return
            if flags & WITHDRAW:
                if module_len or method_len or body_len:
                    self._refuse(call_id, 400, "malformed withdrawal frame")
                    return
                del buf[:start]
                self._withdraw(call_id)
                continue
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
            # Queued even when there is room: it starts once every frame of this read is
            # parsed, so a withdrawal that came with it finds it (else a replica that ran
            # dry asked in vain for a call its peer had just been sent while busy).
            self._backlog.append((call_id, module, method, body, bool(flags & IN_THREAD)))

    def _withdraw(self, call_id: int) -> None:
        """Takes the queued call ``call_id`` out of the backlog, if it is there: it never runs."""
        for i, queued in enumerate(self._backlog):
            if queued[0] == call_id:
                del self._backlog[i]
                self._answer(call_id, WITHDRAWN, b"")
                return
        self._answer(call_id, KEPT, b"")

    def _room(self) -> bool:
        """Whether another call may start: fewer than ``concurrency`` started and unanswered.

        Answers gathered for a write count until written: when there is no room
        but some are gathered, they are written now, and that makes room.
        """
        limit = self.concurrency
        if limit is None or self._threaded + len(self._out) < limit:
            return True
        if self._out:
            self._flush()
            return self._threaded < limit
        return False

    def _start_backlog(self) -> None:
        backlog = self._backlog
        while backlog and self.transport is not None and not self.transport.is_closing() and self._room():
            self._call(*backlog.popleft())

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
        self._threaded += 1
        task = asyncio.ensure_future(app.call_in_thread(module, method, body))
        task.add_done_callback(lambda t: self._call_done(call_id, t))

    def _call_done(self, call_id: int, task: asyncio.Future[bytes]) -> None:
        self._threaded -= 1
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._answer(call_id, 200, task.result())
        elif isinstance(exc, Exception):
            self._answer_error(call_id, exc)
        try:
            self._start_backlog()
        finally:
            self._flush()

    def _answer_error(self, call_id: int, exc: Exception) -> None:
        from runmap.server.app import error_detail

        status, detail = error_detail(exc)
        self._answer(call_id, status, json.dumps(detail).encode())

    def _answer(self, call_id: int, status: int, body: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client left: nobody waits for this answer
        head = RESPONSE.pack(call_id, status, len(body))
        if len(body) <= SMALL_RESPONSE:
            self._out.append(head + body)  # written with the other answers gathered (see _flush)
        else:
            self._flush()
            transport.writelines((head, body))

    def _flush(self) -> None:
        """Writes the answers gathered so far, in one write."""
        out = self._out
        if not out:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
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
