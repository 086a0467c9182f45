"""Runs one servlet process: ``python -m runmap.server``.

The launcher writes one JSON line of configuration to the servlet's stdin, the
token among it (never on a command line, where ``ps`` would show it), and keeps
stdin open. The servlet binds its sockets, answers with one JSON line on stdout
(``{"port": ..., "unix": ..., "pid": ...}``), then sends its stdout to its
stderr (the log).

Where it listens, by its configuration: ``host`` and ``port`` (TCP; ``port``
None for none), and ``unix_socket``: a socket file in the user's private
runtime directory, which no other user can take after this servlet ends, as
they can its loopback port (an SSH host's servlets listen on it alone; a local
servlet on it and loopback, and its client on this machine uses the file).

A servlet must not outlive its client. Two signals tell it the client is gone:
end-of-file on stdin (the client's end of the pipe closed, however the client
died), and its parent process changing (a fork of the client kept the pipe).
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import traceback
from typing import Any

from runmap.server import logfile

PARENT_POLL_SECONDS = 0.5
_socket_file: str | None = None  # bind_unix's, removed when the servlet leaves


def stack_imported() -> None:
    """The servlet's own stack is imported: the garbage collector runs again, if its entry point stopped it.

    A servlet's entry (``runmap/server/__main__.py``, the template's command)
    stops the collector before it imports anything: imports make no garbage, and
    the collections they set off found nothing, ~7 ms of a ~65 ms start of a
    template (median of 21, 79.5 -> 72.0 ms). What the imports made lives as long
    as the process, so it is frozen (``gc.freeze``), and no later collection
    looks at it again, nor, in a servlet forked from a template, writes to the
    template's pages it shares. User code runs with the collector on, as ever.
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def bind_unix(directory: str | None = None) -> tuple[socket.socket, str]:
    """A listening Unix socket file in the user's private runtime directory, and its path.

    Only this user can create a file there, so whoever later connects to the path
    reaches this servlet or nothing: unlike a loopback port, which any local user
    may bind once its servlet has gone, and so receive what a client sends to it.
    The file is named after the servlet's pid and removed when it leaves; one that
    a servlet killed outright left behind is removed by the next to start.

    ``directory``: the one a client on this machine found and checked for its
    servlets (cluster/local.py); None: found here (an SSH host's servlet), where
    a path too long for a socket (a deep ``$RUNMAP_HOME``) is an error.
    """
    limit = None  # the client checked its directory
    if directory is None:
        from runmap.paths import SUN_PATH_MAX, runtime_subdir

        directory, limit = str(runtime_subdir("servlets")), SUN_PATH_MAX
    path = os.path.join(directory, f"{os.getpid()}.sock")
    if limit is not None and len(os.fsencode(path)) > limit:
        raise OSError(f"socket path {path} is over {limit} bytes: set RUNMAP_HOME to a shorter directory")
    _remove_stale_sockets(directory)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    global _socket_file
    _socket_file = path
    return sock, path


def _remove_stale_sockets(directory: str) -> None:
    """Removes the socket files in ``directory`` whose servlet (named by its pid) is gone, and ours."""
    for entry in os.scandir(directory):
        pid = entry.name.removesuffix(".sock")
        if not (pid.isdigit() and entry.name.endswith(".sock")):
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # alive (or another user's process now: left alone)
            except ProcessLookupError:
                pass
            except OSError:
                continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


def watch_parent(on_gone: Any) -> None:
    """Calls ``on_gone`` once the client is gone: end-of-file on stdin, or a new parent.

    One thread watches both, waiting on stdin at most ``PARENT_POLL_SECONDS``
    at a time. It is a bare ``_thread`` one: ``threading.Thread.start`` waits
    until the new thread runs, about a millisecond of a servlet's start when
    both cores are busy, and the client's first request waits for it. It never
    holds the process up (the servlet leaves through ``os._exit``).
    """
    parent = os.getppid()

    def watch() -> None:
        poller = select.poll()
        poller.register(0, select.POLLIN)  # end-of-file, a hang-up or a bad descriptor all wake it too
        while os.getppid() == parent:
            if poller.poll(int(PARENT_POLL_SECONDS * 1000)):
                try:
                    if not os.read(0, 65536):  # past the config line sys.stdin read: the rest is ignored
                        break
                except OSError:
                    break
        on_gone()

    _thread.start_new_thread(watch, ())


def raise_open_files_limit() -> None:
    """Lets the servlet open as many descriptors as its hard limit allows (connections are descriptors)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (hard, 1 << 20, 1 << 16):  # an unlimited hard limit is not a soft limit Linux takes
        if soft == resource.RLIM_INFINITY or (target != resource.RLIM_INFINITY and target <= soft):
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return
        except (ValueError, OSError):
            continue


def main() -> None:
    config = json.loads(sys.stdin.buffer.readline())
    raise_open_files_limit()
    name = config["name"]
    os.environ["RUNMAP_REPLICA"] = name
    os.environ.update(config.get("env_vars") or {})

    # runmap's own stack is imported before any path of the user's is added (see command.py).
    from runmap.server.app import DEFAULT_MAX_BODY, build_app
    from runmap.server.http import HttpServer
    from runmap.server.reaper import become_subreaper
    from runmap.server.state import ServletState

    stack_imported()
    user_paths = [config["working_dir"]] if config.get("working_dir") else []
    if user_paths:
        os.chdir(user_paths[0])  # a remote launcher cannot set the cwd itself (SSH: a shipped directory)
    for path in reversed(user_paths + config.get("sys_path", [])):
        if path not in sys.path:
            sys.path.insert(0, path)
    become_subreaper()
    run_as_batch()
    log = logfile.from_config(config)  # before the ready line: a symlink there fails the start

    port = config.get("port", 0)
    sock = bind(config.get("host", "127.0.0.1"), int(port)) if port is not None else None
    where = config.get("unix_socket")  # a directory (a local client's), True (this user's here), or none
    unix_sock, unix = bind_unix(where if isinstance(where, str) else None) if where else (None, None)
    socks = [s for s in (sock, unix_sock) if s is not None]
    app = build_app(ServletState(name), config["token"], int(config.get("max_body", DEFAULT_MAX_BODY)), warm=True)
    server = HttpServer(app, config["token"])

    port = sock.getsockname()[1] if sock is not None else None
    sys.stdout.write(json.dumps({"port": port, "unix": unix, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    # The client is gone, or asks this servlet to leave (it closed stdin): no one waits for
    # an answer any more, not even to calls in flight, so leave at once.
    watch_parent(leave)
    # From here on, whatever user code prints goes to the servlet's log (capped: logfile.py).
    logfile.capture(log)
    signal.signal(signal.SIGTERM, lambda *_: leave())
    try:
        server.serve(socks[0], also=socks[1:])  # returns only when it fails
    except BaseException:
        traceback.print_exc()
    leave(1)


def run_as_batch() -> None:
    """Schedules this servlet as a batch worker (Linux ``SCHED_BATCH``), where the OS has it.

    A replica woken by a request then does not take the CPU from the client that
    sent it, which has more requests to send and answers to read: on a machine
    with as many busy replicas as cores, the client otherwise waited for a core
    in the middle of a map. It is no lower priority: over time a batch thread
    gets the CPU share a normal one gets, and children (user code's processes)
    inherit it.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, policy, os.sched_param(0))


def leave(status: int = 0) -> None:
    """Ends the servlet: first whatever user code forked, then the process, threads and all.

    Threads still running user code must not keep the process alive, hence ``os._exit``.
    """
    from runmap.server.reaper import end_descendants

    end_descendants()
    if _socket_file is not None:
        with contextlib.suppress(OSError):
            os.unlink(_socket_file)
    logfile.drain()
    os._exit(status)


if __name__ == "__main__":
    main()
