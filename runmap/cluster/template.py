"""Local servlets forked from a warm template process, as ``multiprocessing``'s forkserver does.

Starting ``python -P -m runmap.server`` costs a replica about a tenth of a second
of CPU, most of it importing the servlet's stack. A client therefore keeps one
*template* (:mod:`runmap.server.template`), a process that has imported that
stack once and forks a servlet per request. ``runmap.mapper`` starts it without
waiting, before it imports anything else (:mod:`runmap._template_start`), so it
boots while the client imports the rest, and :func:`shared` adopts it; the local
cluster then asks it for each servlet
(:func:`template_for`) and gets a :class:`ForkedProcess`, which the code that
runs servlets (:mod:`runmap.cluster.process`) uses as it uses a
``subprocess.Popen``. The servlet itself is the same: its configuration and
token come on its stdin, never through the template.

A servlet is forked only where that gives what a fresh one would have: on Linux
with pidfds (the client watches and signals a process that is not its child),
from the client's own interpreter, in an environment whose start-up variables
(``PYTHON*``, ``LD_*``, ``MALLOC_*``) are the template's. Otherwise, and inside a
replica, or with ``RUNMAP_TEMPLATE=0``, or whenever the template fails, the
servlet starts plainly.

Lifetimes: the template leaves when its stdin closes (this interpreter exits,
however) or when asked (:meth:`Template.close`); a servlet it forked leaves when
its client closes the servlet's stdin, or when the template, its parent, is gone.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence

from runmap import _template_start
from runmap._template_start import TemplateProcess, pidfd_signal, start, template_env
from runmap._typing import TYPE_CHECKING
from runmap.exceptions import ClusterError

if TYPE_CHECKING:
    from typing import IO, Any

READY_TIMEOUT = 30.0  # for the template to import the servlet's stack, on a loaded machine
REPLY_TIMEOUT = 10.0  # for it to fork one servlet
STATUS_TIMEOUT = 5.0  # between a servlet's end and the template's word on how it ended
MAX_MESSAGE = 1 << 16
LOST = -1000
"""A forked servlet's return code when its exit status was lost with its template."""
STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_")
"""Environment variables an interpreter reads as it starts: a fork has the template's."""
READ_LATER = frozenset({"PYTHONBREAKPOINT"})  # read at each breakpoint() (Ray's driver sets it)


class TemplateError(ClusterError):
    """The template process failed or is gone; the servlet starts plainly instead."""


class Template:
    """A running template process, and this client's end of its control socket.

    Args:
        env: the template's environment; the servlets it forks get their own.
    """

    def __init__(self, env: Mapping[str, str], started: TemplateProcess | None = None) -> None:
        self.proc = started if started is not None else start(env)  # its stdin's end-of-file: leave
        self.env = self.proc.env
        self._lock = threading.Lock()
        self._exits: dict[int, int] = {}  # pid -> return code, as the template reported
        # The template answers requests one at a time, in the order they came: the n-th answer
        # (a pid, or an error) is the n-th request's, whichever thread reads it.
        self._asked = 0  # requests sent
        self._answered = 0  # answers read
        self._answers: dict[int, tuple[dict[str, Any], list[int]]] = {}  # request number -> answer, until taken
        self._ready = False
        self._lost = False
        self._sock = socket.socket(fileno=self.proc.control)
        # Its end is read from a pidfd, not from waitpid: a library in this client (Ray's driver)
        # may reap children that are not its own, and Popen.poll would then call it ended at once.
        self._pidfd = self.proc.pidfd
        _close_with(self, self._pidfd)

    @property
    def came_up(self) -> bool:
        """Whether it said it was ready, once."""
        return self._ready

    @property
    def usable(self) -> bool:
        return not self._lost and not _ended(self._pidfd, 0)

    def fits(self, python: str, env: Mapping[str, str]) -> bool:
        """Whether a servlet on ``python`` with ``env`` can be forked from this template."""
        return python == sys.executable and _startup_vars(env) == _startup_vars(self.env)

    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: str, log_fd: int) -> ForkedProcess:
        """Forks a servlet with ``env`` in ``cwd``, its stderr on ``log_fd``; its stdin and stdout are pipes.

        Raises:
            TemplateError: the template is gone, failed to fork, or did not answer.
        """
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        try:
            request = json.dumps({"env": dict(env), "cwd": cwd}).encode()
            with self._lock:
                deadline = time.monotonic() + READY_TIMEOUT
                while not self._ready:
                    self._receive(deadline)
                try:
                    socket.send_fds(self._sock, [request], [stdin_r, stdout_w, log_fd])
                except OSError as e:
                    raise self._gone(f"it took no request ({e})") from None
                number, self._asked = self._asked, self._asked + 1
            # Another thread's request goes while this one waits: the template forks the next
            # servlet as soon as it has answered this one (a short script's second replica came
            # up a request's round trip, ~3 ms, later).
            with self._lock:
                deadline = time.monotonic() + REPLY_TIMEOUT
                while number not in self._answers:
                    self._receive(deadline)
                reply, fds = self._answers.pop(number)
            if "error" in reply:
                raise TemplateError(f"the template failed to fork a servlet:\n{reply['error']}")
        except BaseException:
            os.close(stdin_w)
            os.close(stdout_r)
            raise
        finally:
            os.close(stdin_r)
            os.close(stdout_w)
        return ForkedProcess(self, int(reply["pid"]), fds[0], os.fdopen(stdin_w, "wb"), os.fdopen(stdout_r, "rb"), argv)

    def exit_code(self, pid: int) -> int:
        """How forked servlet ``pid``, which has ended, ended: its return code, or :data:`LOST`."""
        with self._lock:
            deadline = time.monotonic() + STATUS_TIMEOUT
            while pid not in self._exits:
                try:
                    self._receive(deadline)
                except TemplateError:
                    return LOST
            return self._exits.pop(pid)

    def close(self, wait: float = 0.0) -> None:
        """Asks the template to leave, waiting up to ``wait`` seconds for it to (the servlets it
        forked leave once their clients let them go)."""
        self._lost = True
        self._sock.close()
        self.proc.close_stdin()
        if wait > 0 and _ended(self._pidfd, wait):
            self.proc.wait()  # reaped, now that it has ended

    def _receive(self, deadline: float) -> None:
        """Reads the next message from the template (holding the lock): its readiness, an exit, or an answer."""
        if self._lost:
            raise TemplateError("the template process is gone")
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            raise self._gone("it did not answer in time")
        try:
            data, fds, _, _ = socket.recv_fds(self._sock, MAX_MESSAGE, 1)
        except OSError as e:
            raise self._gone(str(e)) from None
        if not data:
            raise self._gone("it ended")
        message = json.loads(data)
        if "ready" in message:
            self._ready = True
        if "exit" in message:
            self._exits[int(message["exit"])] = int(message["code"])
        if "pid" in message or "error" in message:
            self._answers[self._answered] = (message, fds)
            self._answered += 1

    def _gone(self, why: str) -> TemplateError:
        self._lost = True
        self.proc.kill()
        self.proc.wait()
        self._sock.close()
        return TemplateError(f"the template process failed: {why}")


class ForkedProcess:
    """A servlet the template forked, with the part of ``subprocess.Popen`` that runs a servlet.

    It is not this client's child: it is watched and signalled through a pidfd,
    and its exit status comes from the template that reaps it.
    """

    stderr: IO[bytes] | None = None  # its stderr is its log file

    def __init__(
        self, template: Template, pid: int, pidfd: int, stdin: IO[bytes], stdout: IO[bytes], argv: Sequence[str]
    ) -> None:
        self.pid = pid
        self.args = list(argv)
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None
        self._template = template
        self._pidfd = pidfd
        self._lock = threading.Lock()
        _close_with(self, pidfd)

    def poll(self) -> int | None:
        if self.returncode is None and _ended(self._pidfd, 0):
            self._settle()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not _ended(self._pidfd, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self._settle()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            pidfd_signal(self._pidfd, sig)

    def _settle(self) -> None:
        with self._lock:
            if self.returncode is None:
                self.returncode = self._template.exit_code(self.pid)


def _close_with(owner: object, fd: int) -> None:
    """Closes ``fd`` once ``owner`` is collected, and not at exit: ``weakref.finalize``'s exit hook
    runs before the hooks that close what a script left open, which still wait on these pidfds
    (a Mapper left open took a closed pidfd for an ended servlet, and waited 5 s for its status)."""
    weakref.finalize(owner, os.close, fd).atexit = False


def describe_lost(code: int) -> str | None:
    """Why a forked servlet's exit status is unknown, if ``code`` says it is."""
    return "its exit status was lost with the template process that forked it" if code == LOST else None


def _ended(pidfd: int, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def _startup_vars(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(STARTUP_PREFIXES) and k not in READ_LATER}


_shared: Template | None = None
_shared_lock = threading.Lock()
_broken = False  # a template failed to start in this process: start servlets plainly from now on


def enabled() -> bool:
    """Whether servlets may be forked from a template in this process."""
    return not _broken and _template_start.enabled()


def warm() -> None:
    """Starts this client's template now, without waiting for it, so it boots while the client imports."""
    if enabled():
        shared()


def shared() -> Template | None:
    """This client's template, started if none runs; None where servlets start plainly."""
    global _shared, _broken
    if not enabled():
        return None
    with _shared_lock:
        if _shared is not None and _shared.usable:
            return _shared
        try:  # the one runmap.mapper started as it was imported, the first time
            _shared = Template(template_env(), _template_start.take())
        except OSError:
            _broken = True
            return None
        return _shared


def template_for(python: str, env: Mapping[str, str]) -> Template | None:
    """The template to fork a servlet on ``python`` with ``env`` from, if one fits."""
    template = shared()
    return template if template is not None and template.fits(python, env) else None


def failed(template: Template) -> None:
    """Records that ``template`` could not start a servlet: one that never came up is not tried again."""
    global _broken
    if not template.came_up:
        _broken = True


def current() -> Template | None:
    """This client's template, if one has been started (none is started here)."""
    return _shared


def _close_shared() -> None:
    # At exit: the template leaves on the end-of-file this sends, a millisecond or so later; waiting
    # for that (to reap it) held every script's exit up by as long, and the exit closes its stdin too.
    if _shared is not None:
        _shared.close()


def _forget_in_child() -> None:
    """A fork of this client must not share its template: it starts its own if it needs one."""
    global _shared
    if _shared is not None:
        _shared._sock.close()  # this copy's ends only: the template still ends with the parent
        _shared.proc.close_stdin()
    _shared = None


atexit.register(_close_shared)
os.register_at_fork(after_in_child=_forget_in_child)
