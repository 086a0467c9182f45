"""A servlet's output, written to its log file with a cap on the file's size.

    user code, the server, child processes
        │ fds 1 and 2
        ▼
      a pipe ──► "runmap-log-writer" thread ──► <replica>.log
                                                  │ past the cap: renamed
                                                  ▼
                                                <replica>.log.1  (the previous one, replaced)

A replica that prints without end would otherwise fill the disk. Once the
servlet is up (:func:`runmap.server.runner.main`), its stdout and stderr go
into a pipe that one daemon thread copies to the log file; when the file would
pass ``max_bytes`` (:data:`MAX_LOG_BYTES` unless the launcher's configuration
says ``"log_max_bytes"``), the thread renames it ``<replica>.log.1``, replacing
an older one, and starts a new ``<replica>.log``. A replica thus keeps at most
twice the cap on disk. The cut falls after the last whole line that fits, when
there is one. What the servlet printed before (an import error) went straight
to the file the launcher opened, which is the same file.

The client follows ``<replica>.log`` across these renames (:mod:`runmap.logs`),
holding a shared ``flock`` on the file it reads. A rotation that would delete
a file the client has not opened yet (it is still on the one before) waits
for it, up to :data:`READER_WAIT_SECONDS`: meanwhile the replica's prints
block, as on a slow terminal, and no line is lost to the client's stream.
Log files are created mode 0600 and never opened through a symlink.

When the servlet leaves (:func:`drain`), whatever is still in the pipe is
written before the process ends. A servlet killed outright (``SIGKILL``) loses
what the thread had not yet copied, at most a pipe's worth.
"""

from __future__ import annotations

import _thread
import fcntl
import os
import sys
import threading
import time
from typing import Any

MAX_LOG_BYTES = 64 << 20
"""Default cap on one log file, in bytes: a replica keeps at most twice this on disk."""

READ_SIZE = 1 << 16
DRAIN_SECONDS = 1.0
ROTATED_SUFFIX = ".1"
READER_WAIT_SECONDS = 10.0
"""Longest a rotation waits for a reader still on the file before last (see :meth:`RotatingLog.rotate`)."""


class UnsafeLogError(OSError):
    """The log path is a symlink: the servlet will not write through it."""


def open_log(path: str) -> int:
    """A descriptor appending to ``path``, which it creates mode 0600; never through a symlink.

    Raises:
        UnsafeLogError: ``path`` is a symlink.
        OSError: it cannot be opened.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except OSError:
        if os.path.islink(path):
            raise UnsafeLogError(f"refusing to write the log {path}: it is a symlink") from None
        raise


class RotatingLog:
    """Appends to ``path``; past ``max_bytes``, renames it ``path.1`` and starts a new one.

    Every file it writes stays within ``max_bytes``, unless one line is longer
    than that (then the line is split). A write that fails (disk full, a symlink
    planted where the new file goes) is dropped, and the file is opened again
    on the next one: the thread that writes must never stop draining the pipe.
    """

    def __init__(
        self, path: str | os.PathLike[str], max_bytes: int = MAX_LOG_BYTES, reader_wait: float = READER_WAIT_SECONDS
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.reader_wait = reader_wait
        self.fd: int | None = open_log(self.path)
        self.size = os.fstat(self.fd).st_size
        self._replaced: int | None = None  # the file the last rotation deleted, kept open to see its reader leave

    def write(self, data: bytes) -> None:
        while data:
            if self.fd is None and not self._open():
                return  # nowhere to write it: dropped
            room = max(0, self.max_bytes - self.size)
            if len(data) <= room:
                self._write(data)
                return
            cut = data.rfind(b"\n", 0, room) + 1  # after the last whole line that fits
            if cut == 0 and self.size == 0:
                cut = room  # a line longer than the cap, in a fresh file: split it
            if cut:
                self._write(data[:cut])
                data = data[cut:]
            self.rotate()

    def rotate(self) -> None:
        """Renames the file ``<path>.1`` (replacing an older one) and starts a new one.

        A reader following the log (the client, :mod:`runmap.logs`) holds a
        shared ``flock`` on the file it is reading. If it is still on the file
        that the last rotation deleted, this one would delete the next file
        before the reader opened it: so it first waits, up to ``reader_wait``
        seconds, for the reader to move on. Meanwhile the pipe fills and the
        replica's prints block, as they would on a slow terminal.
        """
        self._wait_for_reader()
        self._close_file()
        replaced = _open_quietly(self.path + ROTATED_SUFFIX)
        try:
            os.rename(self.path, self.path + ROTATED_SUFFIX)  # renames a planted symlink itself, never its target
        except OSError:
            if replaced is not None:
                os.close(replaced)
            # It cannot be set aside: empty it rather than let it grow past the cap.
            if self._open() and self.fd is not None:
                try:
                    os.ftruncate(self.fd, 0)
                    self.size = 0
                except OSError:
                    self._close_file()
            return
        self._replaced = replaced
        self._open()

    def close(self) -> None:
        self._close_file()
        if self._replaced is not None:
            os.close(self._replaced)
            self._replaced = None

    def _close_file(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _wait_for_reader(self) -> None:
        fd, self._replaced = self._replaced, None
        if fd is None:
            return
        deadline = time.monotonic() + self.reader_wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only while no reader holds it
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    return
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        return  # a reader that stopped reading must not stop the replica
                    time.sleep(0.005)
                except OSError:
                    return  # no locks here: nothing to wait for
        finally:
            os.close(fd)

    def _open(self) -> bool:
        try:
            self.fd = open_log(self.path)
            self.size = os.fstat(self.fd).st_size
        except OSError:
            self.fd = None
            return False
        return True

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.fd is not None:
            try:
                n = os.write(self.fd, view)
            except OSError:
                return  # disk full, or the like: dropped
            self.size += n
            view = view[n:]


def _open_quietly(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None


class LogCopier:
    """Copies what a pipe carries into ``log`` on a daemon thread, until every write end is closed.

    The pipe and the log are closed at its end. A servlet copies its own output with it
    (:class:`OutputCapture`); the client copies an SSH session's stderr with it, so that an
    SSH replica's log is capped as a local one's is.

    ``bare``: a plain ``_thread`` thread, which the servlet's own copier is.
    ``threading.Thread.start`` waits until the new thread runs, about a
    millisecond when both cores are busy, and a starting servlet's first
    request waits for it; a client's copier stays a ``threading.Thread``, which
    ``threading.enumerate`` (and a test's check for leftovers) sees.
    """

    def __init__(self, read_fd: int, log: RotatingLog, name: str = "runmap-log-writer", bare: bool = False) -> None:
        self.log = log
        self._fd = read_fd
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        if bare:
            _thread.start_new_thread(self._pump, ())
        else:
            self._thread = threading.Thread(target=self._pump, name=name, daemon=True)
            self._thread.start()

    def _pump(self) -> None:
        try:
            while True:
                try:
                    data = os.read(self._fd, READ_SIZE)
                except OSError:
                    return
                if not data:
                    return  # every write end is closed
                try:
                    self.log.write(data)
                except Exception:  # a dead writer would leave every print blocked on a full pipe
                    pass
        finally:
            os.close(self._fd)
            self.log.close()
            self._finished.set()

    @property
    def done(self) -> bool:
        """Whether the copy reached the pipe's end."""
        return self._finished.is_set() if self._thread is None else not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the copy to reach the pipe's end (a ``threading`` copier: for its thread's end); whether it has."""
        if self._thread is None:
            return self._finished.wait(timeout)
        self._thread.join(timeout)
        return not self._thread.is_alive()


class OutputCapture:
    """Sends fds 1 and 2 into a pipe that a daemon thread copies to ``log``."""

    def __init__(self, log: RotatingLog) -> None:
        self.log = log
        self._closed = False
        self._lock = threading.Lock()
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        if log.fd is not None:
            log.size = os.fstat(log.fd).st_size  # counting what was written through the launcher's descriptor
        read_fd, write_fd = os.pipe()
        self._copier = LogCopier(read_fd, log, bare=True)
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)

    def close(self, timeout: float = DRAIN_SECONDS) -> None:
        """Writes what is left in the pipe to the log; fds 1 and 2 go to /dev/null from here on."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        # The thread reads to end-of-file unless a process the user started still holds the pipe.
        self._copier.join(timeout)


_capture: OutputCapture | None = None


def from_config(config: dict[str, Any]) -> RotatingLog | None:
    """The servlet's log, opened, if the launcher named one (``"log"``, ``"log_max_bytes"``).

    Raises:
        UnsafeLogError: the log path is a symlink.
    """
    path = config.get("log")
    if not path:
        return None
    return RotatingLog(path, int(config.get("log_max_bytes") or MAX_LOG_BYTES))


def capture(log: RotatingLog | None) -> None:
    """From here on, what the servlet prints goes to ``log`` (capped); without one, to its stderr."""
    global _capture
    if log is None:
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        return
    _capture = OutputCapture(log)


def drain(timeout: float = DRAIN_SECONDS) -> None:
    """Before the process ends: writes what is still in the pipe to the log."""
    if _capture is not None:
        _capture.close(timeout)


def _flush(stream: Any) -> None:
    try:
        stream.flush()
    except (OSError, ValueError, AttributeError):
        pass
