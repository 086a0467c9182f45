"""Replicas' output, live on the client: each line a servlet prints, prefixed with its name.

    replica process ── stdout+stderr ──► its log file (kept: ``runmap logs REPLICA``)
                                              │  tailed from where this launch began
                                              ▼
    client: one "runmap-logs" thread ── "(power_replica_1) line" ──► sys.stdout

A servlet's stdout and stderr both go to its log file (the cluster opens the
file, the servlet's log writer appends to it). One daemon thread per client process
follows the log files of the live servlets it was told about and writes each
new line, prefixed with the replica's name as Ray does for its workers, to the
client's stdout, where a plain ``map`` would have printed it. It writes through
``tqdm.write`` so that lines appear above a progress bar, not through it.

The thread runs only while there is a log to follow: it starts with the first
servlet and ends once the last one has stopped, so it never outlives the
clusters. When a servlet stops, what is left of its log is printed first.

A log file has a cap (:mod:`runmap.server.logfile`): past it, the servlet
renames it ``<replica>.log.1`` and starts a new ``<replica>.log``. The thread
notices the path now names another file, reads the old one to its end, then
the new one from its start (or ``<replica>.log.1`` first, if the servlet
rotated twice since the last look), so no line is lost or printed twice. It
holds a shared ``flock`` on the file it reads, and a servlet about to rotate
away a file this thread has not opened yet waits for it (up to 10 s) first.
Logs are opened without following symlinks.

Example:
    >>> import runmap as rm
    >>> def shout(x):
    ...     print("got", x)
    ...     return x
    >>> with rm.mapper(shout, num_replicas=1) as m:  # doctest: +SKIP
    ...     m.map([1], progress=False)
    (shout) got 1
    [1]
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from runmap.server.logfile import ROTATED_SUFFIX

if TYPE_CHECKING:
    from runmap.cluster.base import Cluster
    from runmap.module import Remote
    from runmap.servlet import Servlet

POLL_SECONDS = 0.1
ACTIVE_POLL_SECONDS = 0.01  # between looks at logs that had new lines at the last one
LOCK_TRIES = 50
READ_LIMIT = 1 << 20  # bytes read from one log per pass, so one chatty replica cannot starve the rest


@dataclass(eq=False)
class LogTail:
    """A reader of one replica's log from byte ``offset`` on, across its rotations (see below).

    The client's stream and ``runmap logs -f`` both read logs through it.
    """

    path: Path
    offset: int = 0
    partial: bytes = b""
    file: IO[bytes] | None = field(default=None, repr=False)
    finished: bool = False  # the open file was rotated away: nothing more will be written to it
    behind: bool = False  # the last read stopped at READ_LIMIT: more is waiting

    def open(self) -> bool:
        """Opens the log at ``offset`` if not open yet; False if it cannot (yet)."""
        if self.file is None:
            try:
                self.file = _open_log(self.path)
            except OSError:
                return False
            self.file.seek(self.offset)
        return True

    def read_lines(self, final: bool = False) -> list[str]:
        """The complete lines written since the last read (and, if ``final``, the rest)."""
        if not self.open():
            return []
        try:
            data = self.partial + self._read(final)
        except OSError:
            return []
        *lines, self.partial = data.split(b"\n")
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        return [line.decode(errors="replace").rstrip("\r") for line in lines]

    def read_bytes(self, final: bool = False) -> bytes:
        """What was written since the last read (all of it, if ``final``; else up to READ_LIMIT)."""
        if not self.open():
            return b""
        try:
            return self._read(final)
        except OSError:
            return b""

    def _read(self, final: bool) -> bytes:
        """Up to READ_LIMIT bytes (all, if ``final``), across rotations of the log.

        The servlet renames a full log ``<name>.log.1`` and starts a new one
        (:mod:`runmap.server.logfile`). Once the path names another file than
        the open one, nothing more is written to the open one: it is read to its
        end, then the next file is opened from its start.
        """
        assert self.file is not None
        chunks = []
        budget = READ_LIMIT
        while True:
            want = -1 if final else budget
            if want == 0:
                self.behind = True
                break
            chunk = self.file.read(want)
            chunks.append(chunk)
            budget -= len(chunk)
            if not final and len(chunk) == want:
                continue  # the budget is spent: the check above ends the pass
            # At the end of the open file. Was it rotated away?
            if self.finished:
                if self._next_file():
                    continue
                break
            if not self._rotated():
                self.behind = False
                break
            self.finished = True  # complete now: read what was written before the rename, then move on
        return b"".join(chunks)

    def _rotated(self) -> bool:
        """Whether the path names another file than the open one; seeks back to 0 if the file was truncated."""
        assert self.file is not None
        try:
            on_disk = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False  # between the rename and the new file: look again next time
        mine = os.fstat(self.file.fileno())
        if (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino):
            return True
        if mine.st_size < self.file.tell():
            self.file.seek(0)  # emptied in place (the servlet could not rename it): read it again from the start
        return False

    def _next_file(self) -> bool:
        """Moves to the file written after the finished one, from its start.

        That is ``<name>.log``, unless ``<name>.log.1`` is another file than the
        finished one: then the servlet rotated twice since the last look, and
        ``<name>.log.1`` comes first.
        """
        assert self.file is not None
        mine = os.fstat(self.file.fileno())
        current = _try_open(self.path)
        previous = _try_open(self.path.with_name(self.path.name + ROTATED_SUFFIX))
        chosen = current
        if previous is not None:
            seen = {(mine.st_dev, mine.st_ino)}
            if current is not None:
                st = os.fstat(current.fileno())
                seen.add((st.st_dev, st.st_ino))
            st = os.fstat(previous.fileno())
            if (st.st_dev, st.st_ino) not in seen:
                chosen = previous
        for f in (current, previous):
            if f is not None and f is not chosen:
                f.close()
        if chosen is None:
            return False  # nothing to move to yet: the finished file stays open, at its end
        self.file.close()
        self.file = chosen
        self.finished = False
        return True

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _open_log(path: Path) -> IO[bytes]:
    """``path`` for reading, never through a symlink, with a shared lock held until it is closed.

    The lock tells the servlet a reader is still on this file: it waits for the
    reader to move on before a rotation would delete the file after this one
    (:meth:`runmap.server.logfile.RotatingLog.rotate`).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    for _ in range(LOCK_TRIES):  # the servlet holds its lock only for an instant, to test for ours
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.001)
        except OSError:
            break  # a file system without locks: followed all the same
    return os.fdopen(fd, "rb")


def _try_open(path: Path) -> IO[bytes] | None:
    try:
        return _open_log(path)
    except OSError:
        return None


def read_whole(path: Path) -> bytes:
    """A log file's content, never through a symlink; empty if there is none."""
    f = _try_open(path)
    if f is None:
        return b""
    with f:
        return f.read()


def _print(line: str) -> None:
    from tqdm.auto import tqdm

    try:
        tqdm.write(line, file=sys.stdout)
    except (OSError, ValueError):  # the client's stdout is closed: nobody to tell
        pass


class LogStreamer:
    """Follows servlets' log files in one thread and prints their new lines.

    Args:
        write: where prefixed lines go (default: the client's stdout, via tqdm).
        poll: seconds between looks at the files.
    """

    def __init__(self, write: Callable[[str], None] = _print, poll: float = POLL_SECONDS) -> None:
        self.write = write
        self.poll = poll
        self._followed: dict[Servlet, LogTail] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, servlet: Servlet, path: Path, offset: int = 0) -> None:
        """Prints what ``servlet`` writes to ``path`` from byte ``offset`` on, until it stops."""
        with self._lock:
            followed = LogTail(path, offset)
            followed.open()  # now, before the servlet can have rotated the file that offset is in
            previous = self._followed.pop(servlet, None)
            if previous is not None:
                previous.close()
            self._followed[servlet] = followed
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="runmap-logs", daemon=True)
                self._thread.start()

    def unfollow(self, servlet: Servlet) -> None:
        """Prints what is left of ``servlet``'s log and stops following it."""
        with self._lock:
            followed = self._followed.pop(servlet, None)
            if followed is not None:
                self._pump(servlet, followed, final=True)
        self._wake.set()

    @property
    def following(self) -> list[Servlet]:
        with self._lock:
            return list(self._followed)

    def _run(self) -> None:
        while True:
            self._wake.clear()
            behind = active = False
            with self._lock:
                if not self._followed:
                    self._thread = None
                    return
                for servlet, followed in list(self._followed.items()):
                    dead = servlet.output_done()  # asked first, so its last words are on disk
                    active = self._pump(servlet, followed, final=dead) or active
                    behind = behind or followed.behind
                    if dead:
                        del self._followed[servlet]
            # A log with more waiting is read again at once, and one being written soon, lest its
            # servlet rotate away a whole file between two looks.
            if not behind:
                self._wake.wait(min(self.poll, ACTIVE_POLL_SECONDS) if active else self.poll)

    def _pump(self, servlet: Servlet, followed: LogTail, final: bool = False) -> bool:
        """Prints the new lines of one log; whether there were any."""
        lines = followed.read_lines(final)
        if final:
            followed.close()
        if lines and streams(servlet):
            name = servlet.name
            for line in lines:
                self.write(f"({name}) {line}")
        return bool(lines)


_streamer = LogStreamer()
_silenced: weakref.WeakKeyDictionary[Cluster, set[str]] = weakref.WeakKeyDictionary()
_silenced_lock = threading.Lock()


def follow(servlet: Servlet, path: Path, offset: int = 0) -> None:
    """Streams ``servlet``'s log from byte ``offset`` to the client until the servlet stops."""
    _streamer.follow(servlet, path, offset)


def unfollow(servlet: Servlet) -> None:
    """Prints the rest of ``servlet``'s log and stops streaming it. Safe to call twice."""
    _streamer.unfollow(servlet)


def silence(*remotes: Remote) -> None:
    """Stops streaming the output of these modules' envs, and of their replicas, to the client.

    Their logs are still written to their files.
    """
    with _silenced_lock:
        for remote in remotes:
            servlet = remote.servlet
            _silenced.setdefault(servlet.cluster, set()).add(servlet.env.origin)


def streams(servlet: Servlet) -> bool:
    """Whether what ``servlet`` prints is shown on the client."""
    cluster = servlet.cluster
    if not getattr(cluster, "stream_logs", True):
        return False
    with _silenced_lock:
        return servlet.env.origin not in _silenced.get(cluster, ())
