"""uvicorn's httptools protocol, writing each small response in one system call.

uvicorn writes a response's head when the app sends ``http.response.start``
and its body when the app sends ``http.response.body``: two ``send`` calls,
two TCP segments, and on the client two wake-ups and two ``recv`` calls for
every small call. Here the head is held back until the body's first write and
both go out together (``writelines``: one vectored write, no copy).

Only a complete response head (``HTTP/1.1 ...\\r\\n\\r\\n``, not an interim
``100 Continue``) is held, and it is released by the next write, at the end
of the response (a response to ``HEAD`` has no body write), or by ``close``,
so nothing can be left behind.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _CoalescingTransport:
    """Wraps a transport; holds a response head until the write that follows it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines((held, data))
        elif data[:9] == b"HTTP/1.1 " and data[9:12] != b"100" and data[-4:] == b"\r\n\r\n":
            self._held = bytes(data)
        else:
            self._transport.write(data)

    def writelines(self, lines: Any) -> None:
        self.flush()
        self._transport.writelines(lines)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=CoalescingHttpToolsProtocol)``: one write per small response."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._coalescing = _CoalescingTransport(transport)
        super().connection_made(self._coalescing)  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        self._coalescing.flush()
        super().on_response_complete()
