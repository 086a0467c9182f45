"""Starts the servlets' template process first thing, before the client imports the rest.

A short script's first replicas are forked from the template
(:mod:`runmap.server.template`), which takes ~60 ms to boot, and they wait for
it: each millisecond before it starts is one more the script waits. Starting it
takes ``os`` and ``_socket`` only (``posix_spawn`` and a socketpair), where
``subprocess``, ``socket`` and ``json``, with which :mod:`runmap.cluster.template`
then talks to it, take ~10 ms to import. ``runmap.mapper`` calls :func:`warm` as
its first act; the cluster's template adopts the process (:func:`take`).

What ``subprocess.Popen(close_fds=True, start_new_session=True)`` gives, this
does too: the template gets its stdin (a pipe), ``/dev/null`` for stdout and
stderr, its end of the control socket as descriptor 3, and no other descriptor
of this client's (those not already closed on exec are closed in the child),
in a session of its own (a Ctrl-C in the terminal is the client's to handle).
"""

from __future__ import annotations

import os
import sys

from runmap._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

CONTROL_FD = 3  # the template's end of its control socket, in the template
# The collector is off while the template imports the servlet's stack (runmap.server.runner.stack_imported).
TEMPLATE_CODE = "import gc; gc.disable(); from runmap.server.template import main; main()"


class TemplateProcess:
    """A started template: its pid, a pidfd for it, and this client's ends of its control socket and stdin."""

    def __init__(self, pid: int, control: int, stdin: int, env: dict[str, str]) -> None:
        self.pid = pid
        self.control = control  # a SOCK_SEQPACKET socket's descriptor
        self.stdin = stdin  # its write end: closing it asks the template to leave
        self.env = env
        self.pidfd: int = os.pidfd_open(pid)  # type: ignore[attr-defined]
        self.returncode: int | None = None
        self._stdin_open = True

    def close_stdin(self) -> None:
        """Closes this client's end of its stdin, once (the number may be reused after): it leaves."""
        if self._stdin_open:
            self._stdin_open = False
            os.close(self.stdin)

    def kill(self) -> None:
        import signal

        pidfd_signal(self.pidfd, signal.SIGKILL)

    def wait(self) -> int:
        """Reaps it (it has ended, or is about to); its return code."""
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped by a library that reaps every child (Ray's driver)
                self.returncode = 0
        return self.returncode


def pidfd_signal(pidfd: int, sig: int) -> None:
    """Sends ``sig`` to the process of ``pidfd``, which may have ended (a pidfd never names another)."""
    import signal

    try:
        signal.pidfd_send_signal(pidfd, sig)  # type: ignore[attr-defined]
    except ProcessLookupError:
        pass  # it has ended


def template_env() -> dict[str, str]:
    """The environment a client's template runs in: its own, unbuffered."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def enabled() -> bool:
    """Whether servlets may be forked from a template in this process (Linux with pidfds, Python 3.11+)."""
    return (
        sys.version_info >= (3, 11)  # -P
        and _pidfds_work()
        and os.environ.get("RUNMAP_TEMPLATE", "1") != "0"
        and "RUNMAP_REPLICA" not in os.environ  # a replica's own clusters start theirs plainly
    )


def start(env: Mapping[str, str]) -> TemplateProcess:
    """Spawns the template, ``python -P -c TEMPLATE_CODE``, with ``env``.

    ``-c``, not ``-m``: running a module as ``__main__`` imports ``runpy`` and
    ``importlib.util``, which no servlet needs (measured: ~1 ms of a 58 ms boot).

    Raises:
        OSError: it could not be started.
    """
    import _socket

    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    stdin_r, stdin_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    moved: list[int] = []
    try:
        stdin_src, null_src, control_src = (_above_targets(fd, moved) for fd in (stdin_r, devnull, theirs.fileno()))
        actions: list[tuple[int, ...]] = [
            (os.POSIX_SPAWN_DUP2, stdin_src, 0),
            (os.POSIX_SPAWN_DUP2, null_src, 1),
            (os.POSIX_SPAWN_DUP2, null_src, 2),  # failures come back on the control socket
            (os.POSIX_SPAWN_DUP2, control_src, CONTROL_FD),
        ]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > CONTROL_FD]
        argv = [sys.executable, "-P", "-c", TEMPLATE_CODE, str(CONTROL_FD)]
        try:
            pid = os.posix_spawn(sys.executable, argv, dict(env), file_actions=actions, setsid=True)
        except NotImplementedError as e:  # a libc without POSIX_SPAWN_SETSID
            raise OSError(f"posix_spawn cannot start a session here: {e}") from None
        process = TemplateProcess(pid, ours.fileno(), stdin_w, dict(env))
        ours.detach()  # the process's now
    except BaseException:
        ours.close()
        os.close(stdin_w)
        raise
    finally:
        for fd in (stdin_r, devnull, *moved):
            os.close(fd)
        theirs.close()
    return process


_early: TemplateProcess | None = None
_taken_over = False  # the cluster's template (runmap.cluster.template) has started or adopted one


def warm() -> None:
    """Starts this client's template now, without waiting for it, if templates are enabled and none was."""
    global _early
    if _early is None and not _taken_over and enabled():
        try:
            _early = start(template_env())
        except OSError:
            pass  # the cluster's template tries again, and falls back to plain starts


def _forget_in_child() -> None:
    """A fork of this client must not hold its template's ends: the template still ends with the parent."""
    global _early
    if _early is not None:
        os.close(_early.control)
        _early.close_stdin()
        _early = None


os.register_at_fork(after_in_child=_forget_in_child)


def take() -> TemplateProcess | None:
    """The template :func:`warm` started, handed over once (None if none was, or it was taken).

    From then on the cluster's template starts them, and :func:`warm` does nothing.
    """
    global _early, _taken_over
    _taken_over = True
    early, _early = _early, None
    return early


def _above_targets(fd: int, moved: list[int]) -> int:
    """``fd``, or a copy of it above the descriptors the child's are copied to (a copy onto itself does nothing)."""
    if fd > CONTROL_FD:
        return fd
    import fcntl

    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, CONTROL_FD + 1)
    moved.append(copy)
    return copy


def _inheritable_fds() -> list[int]:
    """This process's descriptors that are not closed on exec (Python's are, unless made inheritable)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.get_inheritable(int(name)):
                fds.append(int(name))
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return fds


def _pidfds_work() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return False
    import _signal

    return hasattr(_signal, "pidfd_send_signal") and hasattr(os, "posix_spawn")
