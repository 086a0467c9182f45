"""Replicas' output, live on the client: each line a servlet prints, prefixed with its name.

    replica process ── stdout+stderr ──► its log file (kept: ``runmap logs REPLICA``)
                                              │  tailed from where this launch began
                                              ▼
    client: one "runmap-logs" thread ── "(power_replica_1) line" ──► sys.stdout

A servlet's stdout and stderr both go to its log file (the runner sends stdout
to stderr, the cluster opens the file). One daemon thread per client process
follows the log files of the live servlets it was told about and writes each
new line, prefixed with the replica's name as Ray does for its workers, to the
client's stdout, where a plain ``map`` would have printed it. It writes through
``tqdm.write`` so that lines appear above a progress bar, not through it.

The thread runs only while there is a log to follow: it starts with the first
servlet and ends once the last one has stopped, so it never outlives the
clusters. When a servlet stops, what is left of its log is printed first.

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

import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from runmap.cluster.base import Cluster
    from runmap.module import Remote
    from runmap.servlet import Servlet

POLL_SECONDS = 0.1
READ_LIMIT = 1 << 20  # bytes read from one log per pass, so one chatty replica cannot starve the rest


@dataclass(eq=False)
class _Followed:
    servlet: Servlet
    path: Path
    offset: int
    partial: bytes = b""
    file: IO[bytes] | None = field(default=None, repr=False)

    def read_lines(self, final: bool = False) -> list[str]:
        """The complete lines written since the last read (and, if ``final``, the rest)."""
        chunks = []
        try:
            if self.file is None:
                self.file = open(self.path, "rb")
                self.file.seek(self.offset)
            while True:
                chunk = self.file.read(READ_LIMIT)
                chunks.append(chunk)
                if not final or not chunk:
                    break
        except OSError:
            return []
        data = self.partial + b"".join(chunks)
        *lines, self.partial = data.split(b"\n")
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        return [line.decode(errors="replace").rstrip("\r") for line in lines]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


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
        self._followed: dict[Servlet, _Followed] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, servlet: Servlet, path: Path, offset: int = 0) -> None:
        """Prints what ``servlet`` writes to ``path`` from byte ``offset`` on, until it stops."""
        with self._lock:
            self._followed[servlet] = _Followed(servlet, path, offset)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="runmap-logs", daemon=True)
                self._thread.start()

    def unfollow(self, servlet: Servlet) -> None:
        """Prints what is left of ``servlet``'s log and stops following it."""
        with self._lock:
            followed = self._followed.pop(servlet, None)
            if followed is not None:
                self._pump(followed, final=True)
        self._wake.set()

    @property
    def following(self) -> list[Servlet]:
        with self._lock:
            return list(self._followed)

    def _run(self) -> None:
        while True:
            self._wake.clear()
            with self._lock:
                if not self._followed:
                    self._thread = None
                    return
                for servlet, followed in list(self._followed.items()):
                    dead = not servlet.is_alive()  # asked first, so its last words are on disk
                    self._pump(followed, final=dead)
                    if dead:
                        del self._followed[servlet]
            self._wake.wait(self.poll)

    def _pump(self, followed: _Followed, final: bool = False) -> None:
        lines = followed.read_lines(final)
        if final:
            followed.close()
        if lines and streams(followed.servlet):
            name = followed.servlet.name
            for line in lines:
                self.write(f"({name}) {line}")


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
