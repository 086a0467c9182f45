"""The process behind a servlet, whatever runs it: how it ended, how to stop it, how to watch it.

Every cluster kind launches servlets its own way, and hands back a
:class:`ServletProcess`: a local subprocess, an SSH session to a host, a Ray
actor. Everything above (the pool, the registry, the ``runmap`` command) asks
it the same questions:

- :meth:`~ServletProcess.poll`: ``None`` while it runs, else an :class:`ExitStatus`:
  data (exit code, signal, host lost, node died, with the cluster's own cause),
  never a string to parse later;
- :meth:`~ServletProcess.stop` (gracefully, then by force) and
  :meth:`~ServletProcess.kill` (at once);
- :meth:`~ServletProcess.watch`: call back once when it ends, at once, also
  while it is idle (local and SSH processes through a pidfd in one watcher
  thread, Ray actors through a pending call on the actor);
- ``log``: where its output is, for the client's log stream and ``runmap logs``.

:class:`SubprocessServlet` is the process for every kind that starts a servlet
as a child of the client: ``python -P -m runmap.server`` on this machine, or
``ssh host <that command>`` for an SSH host. Both speak the same start-up
protocol (one JSON line of configuration, the token with it, on stdin; one
JSON line back on stdout once it listens) and end when their stdin closes.
"""

from __future__ import annotations

import enum
import json
import os
import selectors
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from runmap.cluster.template import Template, TemplateError, describe_lost, failed
from runmap.cluster.watcher import watch_pid
from runmap.exceptions import ClusterError
from runmap.paths import open_private
from runmap.server.logfile import LogCopier, RotatingLog

STOP_GRACE = 3.0  # seconds between asking a servlet to leave and killing it, on every kind
START_TIMEOUT = 60.0


class ExitKind(enum.Enum):
    EXITED = "exited"  # with an exit code
    SIGNALED = "signaled"  # killed by a signal
    STOPPED = "stopped"  # ended by runmap
    HOST_LOST = "host lost"  # the SSH connection to its host ended
    NODE_DIED = "node died"  # Ray: its node died
    GONE = "gone"  # ended, and no more is known (Ray's cause, for instance)


@dataclass(frozen=True)
class ExitStatus:
    """How a servlet's process ended.

    ``str()`` gives it as loky words it: ``SIGKILL(-9)``, ``exit code 1``,
    ``host lost: ...``, ``its node died: ...``, ``stopped by runmap``.
    """

    kind: ExitKind
    code: int | None = None
    signal: int | None = None
    cause: str = ""

    @classmethod
    def from_returncode(cls, code: int) -> ExitStatus:
        if code < 0:
            return cls(ExitKind.SIGNALED, signal=-code)
        return cls(ExitKind.EXITED, code=code)

    @property
    def crashed(self) -> bool:
        """Whether the process itself ended (code or signal), rather than being lost or stopped."""
        return self.kind in (ExitKind.EXITED, ExitKind.SIGNALED)

    def __str__(self) -> str:
        if self.kind is ExitKind.SIGNALED and self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            text = f"{name}(-{self.signal})"
        elif self.kind is ExitKind.EXITED:
            text = f"exit code {self.code}"
        elif self.kind is ExitKind.STOPPED:
            text = "stopped by runmap"
        elif self.kind is ExitKind.NODE_DIED:
            text = "its node died"
        else:
            text = self.kind.value
        if self.cause and self.cause != text:
            return f"{text}: {self.cause}" if self.kind in (ExitKind.HOST_LOST, ExitKind.NODE_DIED) else self.cause
        return text


STOPPED = ExitStatus(ExitKind.STOPPED)


def describe_returncode(code: int) -> ExitStatus:
    """A local child's return code as an :class:`ExitStatus` (a forked servlet's may be lost)."""
    lost = describe_lost(code)
    return ExitStatus(ExitKind.GONE, cause=lost) if lost else ExitStatus.from_returncode(code)


class ChildProcess(Protocol):
    """What runs a servlet here: a ``subprocess.Popen``, or a servlet forked by the template
    (:class:`runmap.cluster.template.ForkedProcess`)."""

    @property
    def pid(self) -> int: ...
    @property
    def args(self) -> Any: ...
    @property
    def stdin(self) -> IO[bytes] | None: ...
    @property
    def stdout(self) -> IO[bytes] | None: ...
    @property
    def stderr(self) -> IO[bytes] | None: ...
    @property
    def returncode(self) -> int | Any: ...

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...


class ServletProcess(ABC):
    """What runs one servlet, on any kind of cluster.

    Attributes:
        pid: its process id where it runs (maybe another machine), if known.
        host: the machine it runs on, as the cluster names it.
        local_pid: a process of *this* machine whose end ends the servlet (the
            servlet itself, or the SSH session that runs it), for ``runmap down``.
        log: the file its output goes to, on this machine, if there is one.
    """

    pid: int | None = None
    host: str = "localhost"
    local_pid: int | None = None
    log: Path | None = None
    log_offset: int = 0  # where this launch's output starts in ``log``

    @abstractmethod
    def poll(self) -> ExitStatus | None:
        """``None`` while it runs; how it ended, once it has."""

    @abstractmethod
    def stop(self) -> None:
        """Asks it to leave, waits up to ``STOP_GRACE``, then kills it. Safe to call twice."""

    def kill(self) -> None:
        """Ends it at once, even in the middle of a call."""
        self.stop()

    @abstractmethod
    def watch(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` (from another thread) once the process has ended."""

    def output_done(self) -> bool:
        """Whether all it will ever write is in its log: it ended (and, where a thread of this
        client copies its output, the copy is complete). Never blocks: the log's reader asks it."""
        return self.poll() is not None

    def release(self) -> None:  # noqa: B027 - most processes hold nothing
        """Frees what the handle holds (pipes, forwards) once the process has ended."""


class SubprocessServlet(ServletProcess):
    """A servlet run by a child process of this client: the servlet itself, or ``ssh``.

    Args:
        proc: the child; its stdin is the servlet's (closing it asks it to leave).
        describe_exit: turns the child's return code into an :class:`ExitStatus`
            (an SSH session's 255 is a lost host, not an exit code).
        log_copier: the thread copying the child's stderr into ``log``, if one does
            (:func:`start_subprocess_servlet`): once stopped, the log is complete when it is done.
    """

    def __init__(
        self,
        proc: ChildProcess,
        log: Path | None,
        log_offset: int = 0,
        host: str = "localhost",
        pid: int | None = None,
        describe_exit: Callable[[int], ExitStatus] = describe_returncode,
        on_release: Callable[[], None] | None = None,
        log_copier: LogCopier | None = None,
    ) -> None:
        self.proc = proc
        self.log_copier = log_copier
        self.log = log
        self.log_offset = log_offset
        self.host = host
        self.pid = pid if pid is not None else proc.pid
        self.local_pid = proc.pid
        self._describe_exit = describe_exit
        self._on_release = on_release
        self._status: ExitStatus | None = None
        self._stopping = False
        self._lock = threading.Lock()
        # Popen.poll answers None, "still running", to a thread that calls it while another does:
        # the watcher's callback, a failover and a probe ask at once when a replica dies.
        self._poll_lock = threading.Lock()

    def poll(self) -> ExitStatus | None:
        if self._status is None:
            with self._poll_lock:
                if self._status is None:
                    code = self.proc.poll()
                    if code is not None:
                        if self.log_copier is not None:
                            self.log_copier.join(STOP_GRACE)  # its last words are in its log before anyone reads them
                        self._status = STOPPED if self._stopping else self._describe_exit(code)
        return self._status

    def output_done(self) -> bool:
        # Not poll(): that waits for the copier, which may be waiting for this very reader (a rotation).
        return self.proc.poll() is not None and (self.log_copier is None or self.log_copier.done)

    def stop(self) -> None:
        with self._lock:
            running = self.proc.poll() is None
            self._stopping = self._stopping or running
        # End-of-file on its stdin is the servlet's signal to leave: it ends what
        # its user code forked, then itself (runner.leave).
        _close(self.proc.stdin)
        if self.proc.poll() is None:
            try:
                wait_exit(self.proc, STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.release()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.stop()

    def watch(self, callback: Callable[[], None]) -> None:
        watch_pid(self.proc.pid, callback)

    def release(self) -> None:
        self.poll()
        if self.proc.returncode is None:
            return
        _kill_group(self.proc.pid)  # what user code forked outlives a servlet that was killed
        _close(self.proc.stdin)
        if self._on_release is not None:
            on_release, self._on_release = self._on_release, None
            on_release()


def start_subprocess_servlet(
    argv: Sequence[str],
    config: Mapping[str, Any],
    log: Path,
    *,
    name: str,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = START_TIMEOUT,
    log_max_bytes: int | None = None,
    template: Template | None = None,
) -> tuple[ChildProcess, dict[str, Any], int, LogCopier | None]:
    """Starts ``argv`` as a servlet, hands it ``config`` on stdin and waits for its ready line.

    Its stderr goes to ``log`` (appended, never through a symlink): straight into the file,
    or, with ``log_max_bytes``, through a pipe that a thread of this client copies into it
    with the servlet's own rotation (an SSH session, whose servlet writes to its stderr). It runs in
    a session and process group of its own, so a Ctrl-C in the terminal reaches
    the client (which then cleans up), not the replicas half-way through a call.
    With a ``template`` (:mod:`runmap.cluster.template`), the servlet is forked
    from it rather than started, unless the template fails.

    Returns:
        the process, its ready line (``{"port": ..., "pid": ...}``), the
        offset in ``log`` where this launch's output starts, and the copier (with
        ``log_max_bytes``: join it before reading the log's last lines).

    Raises:
        ClusterError: it exited or said nothing within ``timeout``; the message
            ends with the tail of its log.
    """
    log_fd = open_private(log)
    copier = None
    try:
        log_start = os.fstat(log_fd).st_size
        if log_max_bytes is None:
            proc = _spawn(argv, log_fd, env, cwd, template)
        else:  # its stderr is copied into the log by a thread here, through a pipe
            proc = _spawn(argv, subprocess.PIPE, env, cwd, None)
    finally:
        os.close(log_fd)
    if proc.stderr is not None and log_max_bytes is not None:  # not forked: a forked one writes its log itself
        copier = LogCopier(os.dup(proc.stderr.fileno()), RotatingLog(log, log_max_bytes), f"runmap-log-{name}")
        proc.stderr.close()
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(dict(config)).encode() + b"\n")
        proc.stdin.flush()
        ready = _read_ready_line(proc, timeout)
    except BaseException:
        _abandon(proc)
        raise
    finally:
        proc.stdout.close()
    if ready is None:
        code = proc.poll()
        _abandon(proc)
        if copier is not None:
            copier.join(STOP_GRACE)
        how = "it said nothing" if code is None else str(ExitStatus.from_returncode(code))
        raise ClusterError(f"servlet {name!r} did not start ({how}); its log {log} ends with:\n{tail(log)}")
    return proc, ready, log_start, copier


def _spawn(
    argv: Sequence[str], stderr: int, env: Mapping[str, str] | None, cwd: str | None, template: Template | None
) -> ChildProcess:
    """The servlet's process, its stderr on ``stderr`` (the log's descriptor, or ``subprocess.PIPE``):
    forked from ``template`` if there is one and it can, else started."""
    if template is not None:
        try:
            return template.start(argv, os.environ if env is None else env, cwd or os.getcwd(), stderr)
        except TemplateError:
            failed(template)  # and start it plainly
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )


def _read_ready_line(proc: ChildProcess, timeout: float) -> dict[str, Any] | None:
    """The servlet's ``{"port": ..}`` line, or None if it died or took too long."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                return None
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return None
            buf += chunk
    try:
        ready = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        return None
    return ready if isinstance(ready, dict) and "port" in ready else None


def wait_exit(proc: ChildProcess, timeout: float) -> int:
    """``proc.wait(timeout)``, woken the moment the child exits.

    ``Popen.wait`` with a timeout polls, sleeping up to 50 ms between looks; a
    pidfd wakes ``poll`` as soon as the child ends (Linux 5.3+; elsewhere, the poll).
    A servlet forked by the template waits on a pidfd of its own already.

    Raises:
        subprocess.TimeoutExpired: it still runs after ``timeout`` seconds.
    """
    if not isinstance(proc, subprocess.Popen):
        return proc.wait(timeout)
    try:
        fd = os.pidfd_open(proc.pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return proc.wait(timeout)
    try:
        if proc.returncode is not None:  # reaped by another thread: the pid may be another process's now
            return proc.returncode
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    return proc.wait()


def _abandon(proc: ChildProcess) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    _kill_group(proc.pid)
    _close(proc.stdin)


def _close(pipe: Any) -> None:
    if pipe is not None and not pipe.closed:
        try:
            pipe.close()
        except OSError:
            pass


def _kill_group(pgid: int) -> None:
    """SIGKILL to what is left of a process group that a servlet led (``start_new_session``)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass  # nothing is left in it


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, or ``(no log)``."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
