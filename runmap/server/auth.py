"""ASGI middleware in front of every servlet route: the token and the body limit.

It sits in front of the routes so that a request without the servlet's token is refused
before any routing, parsing or unpickling happens. Only ``GET /health`` is open.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

try:  # hmac's own, without importing hmac, which imports hashlib and with it OpenSSL's libcrypto
    from _operator import _compare_digest as compare_digest
except ImportError:  # not CPython (tests/server/test_private_apis.py pins it on the versions tested)
    from hmac import compare_digest  # type: ignore[no-redef]

OPEN_PATHS = frozenset({"/health"})


async def send_error(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})


class TokenAndLimitMiddleware:
    """Refuses requests without ``Authorization: Bearer <token>`` and bodies over ``max_body``."""

    def __init__(self, app: ASGIApp, token: str, max_body: int) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if not (scope["path"] in OPEN_PATHS and scope["method"] == "GET"):
            auth = b""
            for key, value in headers:
                if key == b"authorization":
                    auth = value
                    break
            if not compare_digest(auth, self.expected):
                await send_error(send, 401, "missing or wrong token", [(b"www-authenticate", b"Bearer")])
                return
        for key, value in headers:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(send, 400, "bad content-length")
                    return
                if declared > self.max_body:
                    await send_error(send, 413, f"body of {declared} bytes is over the limit of {self.max_body}")
                    return
        await self.app(scope, self._limited(receive), send)

    def _limited(self, receive: Receive) -> Receive:
        # A chunked body has no content-length: count what arrives instead.
        seen = 0
        limit = self.max_body

        async def wrapped() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(seen, limit)
            return message

        return wrapped


class BodyTooLarge(Exception):
    def __init__(self, seen: int, limit: int) -> None:
        super().__init__(f"body of over {seen} bytes is over the limit of {limit}")
