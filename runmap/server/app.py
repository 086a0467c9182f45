"""The servlet's HTTP face: a bare ASGI app over :class:`ServletState`.

Routes (all but ``GET /health`` demand the servlet's bearer token):

    GET    /health                      liveness, no token
    GET    /info                        name, pid, modules, uptime (JSON)
    PUT    /modules/{name}              place a function or build a class instance
    DELETE /modules/{name}              drop it
    POST   /call/{module}/{method}      run a chunk of inputs; "__call__" for functions

A client's dispatch connections carry their calls as binary frames instead,
after one upgrade request that presents the token (frames.py): the same calls,
run by :meth:`ServletApp.call_inline` and :meth:`ServletApp.call_in_thread`,
answered with the same statuses, without an HTTP request's parsing per call.

Payloads are pickles (``application/octet-stream``); errors are JSON
``{"detail": ...}`` with a 4xx status, and user exceptions travel inside the
pickled outcome with a 200, so the transport can tell the two apart.

Why not FastAPI: five fixed routes need no validation, schema or dependency
injection, and on this path they cost. Importing FastAPI takes about 0.3 s of a
replica's start-up, and its routing and request objects about 60 µs of server
CPU a call (measured on this project's 2-core machines: 164 µs of server CPU a
request against 81 µs for a bare ASGI app; see docs/benchmarks.md for the runs).

Where a call runs: user code normally runs in a worker thread, so a slow or
blocking call never stalls the event loop (other connections, ``/health``). A
thread hop costs tens of microseconds, though, which is most of a trivial
call's cost; so a method whose last call was short (under
``INLINE_MAX_SECONDS``) and busy on the CPU (not sleeping or waiting on I/O,
which threads would overlap) runs on the loop itself. One long or waiting call
sends that method back to the threads.

The price: a call that runs on the loop and turns long (its method's earlier
calls took under a millisecond) holds up the loop, ``/health`` included, for
as long as it runs. Measured on 2 cores, running short calls on the loop gives
sequential calls a p50 of ~240 µs instead of ~420 µs, and chunksize-1 maps
~20% more calls a second, so it stays; the damage is bounded instead. The
method goes back to the threads after that one call, and if the call outlasts
the Mapper's ``liveness_timeout``, the Mapper takes the replica for frozen,
kills it, and runs its inputs again with ``?thread`` (``in_thread``), which
keeps them off the loop wherever they land.
"""

from __future__ import annotations

import _thread
import asyncio
import functools
import json
import time

try:
    import resource

    _RUSAGE_THREAD: int | None = resource.RUSAGE_THREAD  # Linux
except (ImportError, AttributeError):
    _RUSAGE_THREAD = None
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from runmap.exceptions import ProtocolError, SerializationError
from runmap.server.auth import BodyTooLarge, Receive, Scope, Send, TokenAndLimitMiddleware
from runmap.server.state import ServletState

OCTET = b"application/octet-stream"
JSON = b"application/json"
DEFAULT_MAX_BODY = 1 << 30
INLINE_MAX_SECONDS = 0.005  # a call this short runs on the loop: a thread hop would cost more than it
INLINE_MIN_CPU_SHARE = 0.5  # ... if it spent at least this share of its time on the CPU,
INLINE_ALWAYS_SECONDS = 0.0002  # or was so short that waiting in it can't matter (a busy machine
# deschedules a 20 µs call now and then; that must not send it back to the threads)


class ClientGone(Exception):
    """The client disconnected before the request body arrived."""


TRIAL_MAX_SECONDS = 0.01  # a call that took at most this in a thread, nearly all of it waiting, ...
TRIAL_EVERY = 8  # ... runs on the loop once in this many such calls, to see whether it was the GIL it waited for


Key = tuple[str, str, int]  # module, method, and the bit length of the request's size


def placement_key(module: str, method: str, body: bytes | memoryview) -> Key:
    return module, method, len(body).bit_length()


class CallPlacement:
    """Remembers, per module method and request size, whether its calls are short and CPU-bound.

    Keys (:func:`placement_key`) hold the size of a call's request, by powers of
    two: one method's chunks of a few inputs and of thousands differ in length
    by orders of magnitude, and a Mapper sends both (its chunks grow from one
    input at the start of every map). Keyed by method alone, the long chunks at
    the end of one map sent the next map's first, one-input chunks to the
    threads (~0.5 ms each on 2 cores, against ~0.1 ms on the loop).

    A call measured in a worker thread waits for the GIL while the loop serves
    other connections (up to the interpreter's 5 ms switch interval), which
    looks like a call that waits on I/O. So a method sent to the threads once
    (the machine descheduled one of its calls) would stay there under load,
    every thread-run call looking slow. A call that took little CPU and at
    most ``TRIAL_MAX_SECONDS`` is therefore tried on the loop now and then:
    there, with no thread to wait for, its measurement is exact.
    """

    def __init__(self) -> None:
        self._inline: dict[Key, bool] = {}
        self._unclear: dict[Key, int] = {}  # thread-run calls that may have waited for the GIL

    def inline(self, key: Key) -> bool:
        if self._inline.get(key, False):
            return True
        unclear = self._unclear.get(key, 0)
        return unclear > 0 and unclear % TRIAL_EVERY == 0

    def record(self, key: Key, wall: float, cpu: float, contended: bool = False) -> None:
        """Records a call's times; ``contended``: it ran on the loop while calls ran in threads.

        Such a call may have waited for the GIL they held, which says nothing of the call:
        unless it took over ``TRIAL_MAX_SECONDS``, it does not send its method to the threads.
        """
        short = wall < INLINE_ALWAYS_SECONDS or (wall < INLINE_MAX_SECONDS and cpu >= INLINE_MIN_CPU_SHARE * wall)
        if contended and not short and wall < TRIAL_MAX_SECONDS and self._inline.get(key, False):
            return
        self._inline[key] = short
        if not short and wall < TRIAL_MAX_SECONDS and cpu < INLINE_ALWAYS_SECONDS:
            self._unclear[key] = self._unclear.get(key, 0) + 1
        else:
            self._unclear.pop(key, None)


def _thread_usage() -> tuple[float, int, int]:
    """This thread's CPU seconds, and its voluntary and involuntary context switches (0, 0 where unknown).

    The CPU seconds come from the thread's CPU clock, not from ``getrusage``:
    Linux derives a thread's ``ru_utime`` and ``ru_stime`` from timer ticks,
    scaled to its exact runtime but never allowed to go back, so they can stand
    still for milliseconds. A 300 µs chunk then read as 0 µs of CPU, a call
    that waited, and went to the threads: on a 2-core VM, 3 in 4 of a 20k-input
    map's chunks did, each paying a thread hop and the loop's wake-up.
    """
    cpu = time.thread_time()
    if _RUSAGE_THREAD is None:
        return cpu, 0, 0
    usage = resource.getrusage(_RUSAGE_THREAD)
    return cpu, usage.ru_nvcsw, usage.ru_nivcsw


def _timed(fn: Callable[..., bytes], *args: Any) -> tuple[bytes, float, float]:
    """``fn(*args)``, its wall seconds and its CPU seconds.

    A call the kernel took the CPU from (involuntary switches) without it ever
    waiting of its own accord (no voluntary switch: no sleep, no I/O, no lock)
    spent its wall time computing or queued for a CPU: it counts as long as its
    CPU time, so a busy machine does not make a short call look like a waiting one.
    """
    wall = time.perf_counter()
    cpu, waited, preempted = _thread_usage()
    out = fn(*args)
    wall = time.perf_counter() - wall
    cpu_after, waited_after, preempted_after = _thread_usage()
    cpu = cpu_after - cpu
    if waited_after == waited and preempted_after > preempted:
        wall = min(wall, cpu)
    return out, wall, cpu


def _off_the_loop(fn: Callable[..., bytes], *args: Any) -> tuple[bytes, float, float]:
    """Runs ``fn`` on the loop's thread as if no loop were running there.

    User code that calls ``asyncio.run`` (or checks for a running loop) must see
    what it would see in a worker thread.
    """
    loop = asyncio.events._get_running_loop()
    asyncio.events._set_running_loop(None)
    try:
        return _timed(fn, *args)
    finally:
        asyncio.events._set_running_loop(loop)


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def respond(send: Send, status: int, body: bytes = b"", content_type: bytes = OCTET) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, status: int, value: Any) -> None:
    await respond(send, status, json.dumps(value).encode(), JSON)


def _segments(scope: Scope) -> list[str]:
    # raw_path keeps "%2F" inside a segment apart from the "/" between segments.
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    raw = raw.split(b"?", 1)[0]
    if b"%" not in raw:
        return raw.decode("utf-8", "replace").split("/")[1:]
    from urllib.parse import unquote_to_bytes  # here: urllib.parse (and ipaddress) cost an idle servlet 0.4 MB

    return [unquote_to_bytes(p).decode("utf-8", "replace") for p in raw.split(b"/")[1:]]


CALL_THREADS = 64  # calls a servlet runs at once: far above any sane concurrency per replica
T = TypeVar("T")


class ServletApp:
    """The routes above, over one :class:`ServletState`."""

    def __init__(self, state: ServletState, warm: bool = False) -> None:
        self.state = state
        self.placement = CallPlacement()
        self._threaded = 0  # calls running in worker threads now
        self._threads = ThreadPoolExecutor(max_workers=CALL_THREADS, thread_name_prefix="runmap-call")
        if warm:
            # The first worker starts now, from a bare thread: the executor starts one with
            # threading.Thread.start, which waits until it runs, and the first request (the module's
            # placement) would wait for that on the loop (~2 ms of a forked servlet's start, measured
            # with both cores busy). The bare thread does the waiting instead.
            _thread.start_new_thread(self._threads.submit, (int,))

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(fn, *args))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except ClientGone:
            return
        except Exception as exc:
            status, detail = error_detail(exc)
            await respond_json(send, status, detail)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        parts = _segments(scope)
        if len(parts) == 3 and parts[0] == "call":
            _allow(method, "POST")
            await self._call(parts[1], parts[2], await read_body(receive), send, scope.get("query_string") == b"thread")
        elif parts == ["health"]:
            _allow(method, "GET")
            await respond_json(send, 200, {"status": "ok"})
        elif parts == ["info"]:
            _allow(method, "GET")
            await respond_json(send, 200, self.state.info())
        elif len(parts) == 2 and parts[0] == "modules":
            _allow(method, "PUT", "DELETE")
            if method == "PUT":
                body = await read_body(receive)
                await respond(send, 200, await self._in_thread(self.state.place_module, parts[1], body))
            else:
                self.state.delete_module(parts[1])
                await respond(send, 204)
        else:
            raise ProtocolError("not found", 404)

    async def _call(self, module: str, method: str, body: bytes, send: Send, in_thread: bool = False) -> None:
        if not in_thread and self.runs_inline(module, method, body):
            result = self.call_inline(module, method, body)
        else:
            result = await self.call_in_thread(module, method, body)
        await respond(send, 200, result)

    def runs_inline(self, module: str, method: str, body: bytes | memoryview) -> bool:
        """Whether this call runs on the loop's thread (see the module's docstring)."""
        return self.placement.inline(placement_key(module, method, body))

    def call_inline(self, module: str, method: str, body: bytes | memoryview) -> bytes:
        """Runs a call on the loop's thread (see the module's docstring for when)."""
        contended = self._threaded > 0
        result, wall, cpu = _off_the_loop(self.state.call, module, method, body)
        self.placement.record(placement_key(module, method, body), wall, cpu, contended or self._threaded > 0)
        return result

    async def call_in_thread(self, module: str, method: str, body: bytes | memoryview) -> bytes:
        self._threaded += 1
        try:
            result, wall, cpu = await self._in_thread(_timed, self.state.call, module, method, body)
        finally:
            self._threaded -= 1
        self.placement.record(placement_key(module, method, body), wall, cpu)
        return result


def error_detail(exc: Exception) -> tuple[int, dict[str, Any]]:
    """The status and JSON detail a request that raised ``exc`` is answered with (HTTP or frame)."""
    if isinstance(exc, ProtocolError):
        return exc.status or 400, {"detail": str(exc)}
    if isinstance(exc, SerializationError):
        return 422, {"detail": str(exc), "side": exc.side}
    if isinstance(exc, BodyTooLarge):
        return 413, {"detail": str(exc)}
    return 500, {"detail": f"servlet error: {exc!r}"}


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise ProtocolError("method not allowed", 405)


def build_app(state: ServletState, token: str, max_body: int = DEFAULT_MAX_BODY, warm: bool = False) -> Any:
    """Builds the ASGI app for ``state``, wrapped in the token and body-limit check.

    ``warm``: its first call thread starts now (a servlet process's app), not at the first request.
    """
    return TokenAndLimitMiddleware(ServletApp(state, warm), token, max_body)
