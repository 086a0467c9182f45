"""The wire format of call frames, shared by the client and the servlet (server/frames.py).

A connection that presented the token may switch from HTTP to frames with an
HTTP/1.1 upgrade (``Connection: Upgrade``, ``Upgrade: runmap-frames/4``,
answered ``101``). It then carries calls only, several at once: each request
carries a call id, which its response repeats, and the servlet answers each
call when it ends, in any order.

    request   !BBHHHIQ header: version, flags, token length, module length,
              method length, call id, body length; then token, module,
              method (UTF-8), and the body (the pickled chunk, as in ``POST /call``)
    response  !IHQ header: call id, status, body length; then the body: the
              pickled outcome with 200, else JSON ``{"detail": ...}`` as over HTTP

The upgrade request may carry ``Runmap-Concurrency: N``: the servlet then runs
at most N of the connection's calls at once and queues the others in order,
so the client may send more than N (server/frames.py says what that promises).

A request with the ``WITHDRAW`` flag, no names and no body takes back the
queued call whose id it carries: the servlet answers that call with status
``WITHDRAWN`` (it never started, and never will) if it was still queued, and
with ``KEPT`` otherwise (it started, or ended: its own answer comes or came).

Version 3 added the cap and version 4 the withdrawal; versions 1 (one call at
a time, no ids), 2 (no cap) and 3 are gone: a client asks for version 4 by
name, and a servlet that does not know it refuses the upgrade, so the two fall
back to HTTP rather than misread each other.
"""

from __future__ import annotations

import struct

UPGRADE = b"runmap-frames/4"
VERSION = 4
IN_THREAD = 1  # flag: run in a thread, never on the loop (the ``?thread`` of HTTP)
WITHDRAW = 2  # flag: take back the queued call of this id (no names, no body)
WITHDRAWN = 0  # status: the call was taken back before it started
KEPT = 1  # status: the call was not taken back (it started, or ended); its answer is its own
REQUEST = struct.Struct("!BBHHHIQ")
RESPONSE = struct.Struct("!IHQ")
MAX_TOKEN = 1024
MAX_NAMES = 8192  # module and method names, together, in bytes
MAX_CALL_ID = (1 << 32) - 1
SCRATCH = 64 << 10  # a response body up to this is cut out of the receive buffer; a larger one is received into its own


class CallHead:
    """The heads of call frames to one method: the token and names are joined once, for every call."""

    def __init__(self, token: bytes, module: bytes, method: bytes) -> None:
        self._sizes = (len(token), len(module), len(method))
        self._names = token + module + method

    def __call__(self, body_length: int, flags: int = 0, call_id: int = 0) -> bytes:
        """A call frame's header, token and names: the body follows them."""
        return REQUEST.pack(VERSION, flags, *self._sizes, call_id, body_length) + self._names


def request_head(
    token: bytes, module: bytes, method: bytes, body_length: int, flags: int = 0, call_id: int = 0
) -> bytes:
    """A call frame's header, token and names: the body follows them."""
    return CallHead(token, module, method)(body_length, flags, call_id)


def withdraw_frame(token: bytes, call_id: int) -> bytes:
    """The frame that takes back the queued call ``call_id``."""
    return REQUEST.pack(VERSION, WITHDRAW, len(token), 0, 0, call_id, 0) + token


class ResponseReader:
    """Cuts responses out of the bytes a connection receives, for a reader that calls ``recv_into``.

    ``buffer()`` is where the next ``recv_into`` writes; ``received(n)`` takes
    the ``n`` bytes it wrote and returns the responses they completed, as
    ``(call id, status, body)``. A large body is received straight into a
    buffer of its own size (no joins, no copies); small ones share one
    reused buffer.
    """

    def __init__(self) -> None:
        self._scratch = bytearray(SCRATCH)
        self._scratch_view = memoryview(self._scratch)
        self._pending = bytearray()  # received, not yet cut into responses
        self._body: bytearray | None = None  # a large body being received in place
        self._body_view: memoryview | None = None
        self._got = 0
        self._head: tuple[int, int] = (0, 0)  # call id and status of that large body

    def buffer(self) -> memoryview:
        if self._body_view is not None:
            return self._body_view[self._got :]
        return self._scratch_view

    def received(self, n: int) -> list[tuple[int, int, bytes]]:
        if self._body_view is not None:
            self._got += n
            if self._got < len(self._body_view):
                return []
            body = self._body
            call_id, status = self._head
            self._body = self._body_view = None
            return [(call_id, status, body)]  # type: ignore[list-item]  # a bytearray: pickle reads it as bytes
        pending = self._pending
        if pending:
            pending += self._scratch_view[:n]
            data: bytearray = pending
        else:  # the common case: cut straight out of the scratch buffer
            data, n_data = self._scratch, n
        end = len(pending) if pending else n_data
        out: list[tuple[int, int, bytes]] = []
        at = 0
        size = RESPONSE.size
        while end - at >= size:
            call_id, status, length = RESPONSE.unpack_from(data, at)
            start = at + size
            have = end - start
            if have >= length:
                out.append((call_id, status, data[start : start + length]))  # type: ignore[arg-type]  # pickle reads a bytearray
                at = start + length
                continue
            if length > SCRATCH:  # receive the rest in place
                body = bytearray(length)
                body[:have] = data[start:end]
                self._body, self._body_view, self._got, self._head = body, memoryview(body), have, (call_id, status)
                at = end
            break
        if pending:
            del pending[:at]
        elif at < end:
            pending += data[at:end]  # a part of a response: kept until the rest comes
        return out
