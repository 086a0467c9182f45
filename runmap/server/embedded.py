"""A servlet in a thread of the current process, for hosts that own the process.

:mod:`runmap.server.runner` makes a whole process a servlet. Some clusters
hand runmap a process that belongs to someone else: a Ray actor is a Ray worker
process, whose main thread Ray keeps for the actor's own methods. There the
servlet (the same app, the same :class:`ServletState`) runs under uvicorn in a
background thread instead, and the host stops it when it is done.

    >>> from runmap.server.embedded import start_servlet
    >>> servlet = start_servlet("demo", token="t0ken")
    >>> servlet.port > 0
    True
    >>> servlet.stop()
"""

from __future__ import annotations

import threading
import time

from runmap.exceptions import ClusterError
from runmap.server.app import DEFAULT_MAX_BODY, build_app
from runmap.server.runner import bind, server_config
from runmap.server.state import ServletState

START_TIMEOUT = 30.0
STOP_TIMEOUT = 3.0


class EmbeddedServlet:
    """A running servlet thread: where it listens, and how to stop it.

    Attributes:
        name: the servlet's (replica's) name.
        host: the address it listens on.
        port: the port it picked.
        state: the modules it holds.
    """

    def __init__(self, name: str, host: str, port: int, state: ServletState, server: object, thread: threading.Thread):
        self.name = name
        self.host = host
        self.port = port
        self.state = state
        self._server = server
        self._thread = thread

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Asks uvicorn to exit and waits up to ``timeout`` for its thread.

        A user call that never returns can keep the thread past that; the thread
        is a daemon, so it does not keep the process alive.
        """
        self._server.should_exit = True  # type: ignore[attr-defined]
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def start_servlet(
    name: str,
    token: str,
    host: str = "127.0.0.1",
    port: int = 0,
    max_body: int = DEFAULT_MAX_BODY,
    timeout: float = START_TIMEOUT,
) -> EmbeddedServlet:
    """Starts a servlet in a daemon thread and returns once it accepts requests.

    Args:
        name: the servlet's name, as its replica is called.
        token: the bearer token every request but ``GET /health`` must carry.
        host: the address to listen on.
        port: the port, or 0 to let the system pick one.
        max_body: the largest request body accepted, in bytes.
        timeout: how long uvicorn may take to start.

    Raises:
        ClusterError: the socket could not be bound, or uvicorn did not start.
    """
    import uvicorn

    try:
        sock = bind(host, port)
    except OSError as exc:
        raise ClusterError(f"servlet {name!r} could not listen on {host}:{port}: {exc}") from exc
    state = ServletState(name)
    server = uvicorn.Server(server_config(build_app(state, token, max_body), token))
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported to the starter below, or lost with the thread
            failure.append(exc)
        finally:
            sock.close()

    thread = threading.Thread(target=serve, name=f"runmap-servlet-{name}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            reason = repr(failure[0]) if failure else f"not started within {timeout:g} s"
            raise ClusterError(f"servlet {name!r} did not start: {reason}")
        time.sleep(0.01)
    return EmbeddedServlet(name, host, int(sock.getsockname()[1]), state, server, thread)
