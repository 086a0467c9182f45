"""A servlet in a thread of the current process, for hosts that own the process.

:mod:`runmap.server.runner` makes a whole process a servlet. Some clusters
hand runmap a process that belongs to someone else: a Ray actor is a Ray worker
process, whose main thread Ray keeps for the actor's own methods. There the
servlet (the same app, the same :class:`ServletState`, the same server) runs on
an event loop of its own in a background thread instead, and the host stops it
when it is done.

    >>> from runmap.server.embedded import start_servlet
    >>> servlet = start_servlet("demo", token="t0ken")
    >>> servlet.port > 0
    True
    >>> servlet.stop()
"""

from __future__ import annotations

import threading

from runmap.exceptions import ClusterError
from runmap.server.app import DEFAULT_MAX_BODY, build_app
from runmap.server.http import HttpServer
from runmap.server.runner import bind
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

    def __init__(
        self, name: str, host: str, port: int, state: ServletState, server: HttpServer, thread: threading.Thread
    ):
        self.name = name
        self.host = host
        self.port = port
        self.state = state
        self._server = server
        self._thread = thread

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ends the server (its connections close, calls in flight are abandoned) and waits
        up to ``timeout`` for its thread.

        A user call that never returns keeps a worker thread, not the servlet's: the
        server's thread ends all the same, and is a daemon anyway.
        """
        self._server.stop()
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
        timeout: how long the server may take to start.

    Raises:
        ClusterError: the socket could not be bound, or the server did not start.
    """
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise ClusterError(f"servlet {name!r} could not listen on {host}:{port}: {exc}") from exc
    port = int(sock.getsockname()[1])
    state = ServletState(name)
    server = HttpServer(build_app(state, token, max_body), token)
    ready = threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve(sock, ready=ready.set)
        except BaseException as exc:  # reported to the starter below, or lost with the thread
            failure.append(exc)
        finally:
            sock.close()
            ready.set()  # wakes the starter if the server failed to start

    thread = threading.Thread(target=serve, name=f"runmap-servlet-{name}", daemon=True)
    thread.start()
    if not ready.wait(timeout) or failure:
        server.stop()
        reason = repr(failure[0]) if failure else f"not started within {timeout:g} s"
        raise ClusterError(f"servlet {name!r} did not start: {reason}")
    return EmbeddedServlet(name, host, port, state, server, thread)
