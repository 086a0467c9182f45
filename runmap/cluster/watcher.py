"""Deaths noticed at once: one thread waits on every servlet process's sentinel.

As loky's executor manager does with its workers' sentinels, one daemon thread
per client (``runmap-watcher``) waits on a pidfd of every child process that
runs a servlet (a local servlet, or the ``ssh`` session that runs a remote one)
and calls back as soon as one ends, whether or not a call was in flight. The
pool then takes the replica out of rotation and starts its replacement before
the next input needs it. Where pidfds are missing (not Linux, or a kernel
before 5.3), the thread polls instead, every ``POLL_SECONDS``.

The thread runs only while there is something to watch, so it never outlives
the clusters.
"""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable

POLL_SECONDS = 0.1


class Watcher:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[int | None, list[Callable[[], None]]]] = {}  # pid -> (pidfd, callbacks)
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    def watch(self, pid: int, callback: Callable[[], None]) -> None:
        """Calls ``callback`` once ``pid`` (a child of this process) has exited."""
        with self._lock:
            entry = self._watched.get(pid)
            if entry is None:
                entry = self._watched[pid] = (_pidfd(pid), [])
            entry[1].append(callback)
            if self._thread is None:
                self._wake_r, self._wake_w = os.pipe()
                self._thread = threading.Thread(
                    target=self._run, args=(self._wake_r, self._wake_w), name="runmap-watcher", daemon=True
                )
                self._thread.start()
            else:
                os.write(self._wake_w, b"x")

    def _run(self, wake_r: int, wake_w: int) -> None:
        sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ)
        registered: set[int] = set()
        try:
            while True:
                with self._lock:
                    if not self._watched:
                        self._thread = None
                        os.close(wake_w)
                        return
                    watched = dict(self._watched)
                for pid, (fd, _) in watched.items():
                    if fd is not None and fd not in registered:
                        sel.register(fd, selectors.EVENT_READ, pid)
                        registered.add(fd)
                polling = any(fd is None for fd, _ in watched.values())
                events = sel.select(POLL_SECONDS if polling else None)
                ended = [key.data for key, _ in events if key.data is not None]
                if any(key.fd == wake_r for key, _ in events):
                    os.read(wake_r, 4096)
                ended += [pid for pid, (fd, _) in watched.items() if fd is None and not _running(pid)]
                for pid in ended:
                    with self._lock:
                        fd, callbacks = self._watched.pop(pid, (None, []))
                    if fd is not None:
                        sel.unregister(fd)
                        registered.discard(fd)
                        os.close(fd)
                    for callback in callbacks:
                        try:
                            callback()
                        except Exception:  # one subscriber's bug must not blind the others
                            pass
        finally:
            sel.close()
            os.close(wake_r)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)  # type: ignore[attr-defined,no-any-return]
    except (AttributeError, OSError):
        return None


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs: its zombie counts as ended, and is left for its owner to reap."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


_watcher = Watcher()


def watch_pid(pid: int, callback: Callable[[], None]) -> None:
    """Calls ``callback`` from the watcher thread once child process ``pid`` has exited."""
    _watcher.watch(pid, callback)
