"""A warm process that forks local servlets: ``python -P -c TEMPLATE_CODE`` (runmap/_template_start.py).

A fresh servlet spends most of its start-up importing its own stack (asyncio, the
HTTP server, cloudpickle): about a tenth of a second of CPU per replica, paid
again for every replica a short script starts. Like ``multiprocessing``'s
forkserver, the template imports that stack once, then forks a servlet for each
request; the child runs :func:`runmap.server.runner.main` exactly as a fresh
servlet would, reading its configuration and token from the stdin it was handed.

The client (:mod:`runmap.cluster.template`) talks to it over a Unix
``SOCK_SEQPACKET`` socket whose descriptor is its one argument: one JSON message per request,
with the child's stdin, stdout and log descriptors alongside (``SCM_RIGHTS``).

    client ── {"env": ..., "cwd": ...} + 3 fds ─►  template ── fork ─► servlet
           ◄─ {"pid": N} + a pidfd of the child ──
           ◄─ {"exit": N, "code": C}  once it has reaped the child

The template is single-threaded, so forking it is safe. It leaves when its
stdin reaches end-of-file (its client ended, however) or the control socket
closes; a servlet it forked leaves when its own client closes its stdin, or
when its parent, the template, is gone (:func:`runmap.server.runner.watch_parent`).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import traceback
from typing import Any

# The servlet's whole stack, imported once here so that every fork has it. cloudpickle too, though a
# fresh servlet imports it only once a pickle needs it: a function of a script's __main__ does, and each
# of a short script's first replicas would import it (~4 ms) while being placed, where here it costs the
# template that once (measured: the whole script 2.5-3.6 ms sooner).
import cloudpickle  # noqa: F401

import runmap.serialization  # noqa: F401
import runmap.server.app  # noqa: F401
import runmap.server.http  # noqa: F401
import runmap.server.reaper  # noqa: F401
import runmap.server.state  # noqa: F401
from runmap.server import runner

try:
    import uvloop  # noqa: F401
except ImportError:  # not on Windows; asyncio serves instead
    pass

MAX_MESSAGE = 1 << 20  # a request carries the servlet's whole environment
CHILD_FDS = 3  # its stdin, stdout, stderr (the log)


def main() -> None:
    runner.stack_imported()  # frozen before the first fork, and the collector on again in every child
    control = socket.socket(fileno=int(sys.argv[1]))
    _send(control, {"ready": os.getpid()})
    children: dict[int, int] = {}  # pidfd -> pid
    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ, "control")
    sel.register(0, selectors.EVENT_READ, "stdin")
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                if not os.read(0, 4096):  # raw reads: sys.stdin's buffer must stay empty for the forks
                    os._exit(0)
            elif key.data == "control":
                try:
                    message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, CHILD_FDS)
                except OSError:
                    os._exit(0)
                if not message:
                    os._exit(0)
                _serve(control, sel, children, message, fds)
            else:
                pid = children.pop(key.fd)
                sel.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                _send(control, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _serve(
    control: socket.socket, sel: selectors.BaseSelector, children: dict[int, int], message: bytes, fds: list[int]
) -> None:
    """Forks one servlet for a request; answers with its pid and a pidfd, or with the error."""
    try:
        request = json.loads(message)
        if len(fds) != CHILD_FDS:
            raise ValueError(f"a request carries {CHILD_FDS} descriptors, not {len(fds)}")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, fds, [sel, control], list(children))
        pidfd = os.pidfd_open(pid)  # before the child can be reaped: only this loop reaps it
    except Exception:
        _send(control, {"error": traceback.format_exc()})
        return
    finally:
        for fd in fds:
            os.close(fd)
    children[pidfd] = pid
    sel.register(pidfd, selectors.EVENT_READ, pid)
    _send(control, {"pid": pid}, [pidfd])


def _send(control: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    try:
        socket.send_fds(control, [json.dumps(message).encode()], fds or [])
    except OSError:  # the client is gone
        os._exit(0)


def _child(request: dict[str, Any], fds: list[int], template_objects: list[Any], pidfds: list[int]) -> None:
    """Becomes a servlet, as ``python -P -m runmap.server`` started with ``request``'s env and cwd."""
    try:
        for obj in template_objects:  # the template's selector and control socket
            obj.close()
        os.setsid()  # a session and process group of its own, as a fresh servlet's start_new_session
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in {*fds, *pidfds} - {0, 1, 2}:
            os.close(fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        if "random" in sys.modules:  # forks share the template's seed; a fresh servlet has its own
            sys.modules["random"].seed()
        runner.main()
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)  # runner.main leaves through os._exit: here it failed before serving


if __name__ == "__main__":
    main()
