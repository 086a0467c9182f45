"""The servlet's HTTP face: a FastAPI app over :class:`ServletState`.

Routes (all but ``GET /health`` demand the cluster's bearer token):

    GET    /health                      liveness, no token
    GET    /info                        name, pid, modules, uptime (JSON)
    PUT    /modules/{name}              place a function or build a class instance
    DELETE /modules/{name}              drop it
    POST   /call/{module}/{method}      run a chunk of inputs; "__call__" for functions

Payloads are pickles (``application/octet-stream``); errors are JSON
``{"detail": ...}`` with a 4xx status, and user exceptions travel inside the
pickled outcome with a 200, so the transport can tell the two apart.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from runmap.exceptions import ProtocolError, SerializationError
from runmap.server.auth import BodyTooLarge, TokenAndLimitMiddleware
from runmap.server.state import ServletState

OCTET = "application/octet-stream"
DEFAULT_MAX_BODY = 1 << 30


def build_app(state: ServletState, token: str, max_body: int = DEFAULT_MAX_BODY) -> Any:
    """Builds the ASGI app for ``state``, wrapped in the token and body-limit check."""
    # No OpenAPI schema or docs pages: they would describe the attack surface to anyone.
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ProtocolError)
    async def _protocol(_: Request, exc: ProtocolError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status or 400)

    @app.exception_handler(SerializationError)
    async def _serialization(_: Request, exc: SerializationError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "side": exc.side}, status_code=422)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"servlet error: {exc!r}"}, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return state.info()

    @app.put("/modules/{name}")
    async def put_module(name: str, request: Request) -> Response:
        body = await request.body()
        return Response(await run_in_threadpool(state.place_module, name, body), media_type=OCTET)

    @app.delete("/modules/{name}")
    async def delete_module(name: str) -> Response:
        state.delete_module(name)
        return Response(status_code=204)

    @app.post("/call/{module}/{method}")
    async def call(module: str, method: str, request: Request) -> Response:
        body = await request.body()
        result = await run_in_threadpool(state.call, module, method, body)
        return Response(result, media_type=OCTET)

    return TokenAndLimitMiddleware(app, token, max_body)
