"""The cluster registry: what runmap runs on this machine, for the ``runmap`` command.

Every open cluster keeps one small JSON file under ``runtime_dir()/clusters``:
its name, kind, the client's pid, and for each servlet a plain record of it
(:meth:`runmap.servlet.Servlet.describe`): name, env, endpoint address, host,
pid where it runs, the pid of a process of *this* machine whose end ends it
(the servlet itself, or the SSH session that runs it on a host), start time and
log path. Never the token: the registry says where servlets are, not how to
call them.

Only the client writes its own file (atomically, by rename), on every servlet
start and stop, and removes it on close. Readers (``runmap status``) skip the
servlets whose processes are gone and delete the files whose client and
servlets are all gone, so a client killed with SIGKILL leaves nothing for long.

    {"name": "hosts", "kind": "ssh", "pid": 4242, "pid_start": 81234, "started": 1718000000.0,
     "servlets": [{"name": "power", "env": "power", "endpoint": "/run/user/0/runmap/fwd/x.sock",
                   "host": "host-a", "pid": 5120, "local_pid": 4250, "local_pid_start": 81302,
                   "started": 1718000001.2, "log": "/run/user/0/runmap/logs/hosts/power.log"}]}

A local pid is recorded with its process's start time (Linux), so a pid the
system has given to another process since is not taken for the old one. A
servlet with no local pid (a Ray actor on another node) is listed while its
client lives.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runmap.paths import open_private, runtime_subdir

if TYPE_CHECKING:
    from runmap.cluster.base import Cluster

SERVLET_COMMAND = "runmap.server"  # in the command line of every servlet process and SSH session

@dataclass
class _Record:
    """What this client remembers of one cluster's entry."""

    path: Path
    started: float
    servlets_started: dict[str, float] = field(default_factory=dict)


_lock = threading.Lock()
_records: weakref.WeakKeyDictionary[Cluster, _Record] = weakref.WeakKeyDictionary()
_batches = 0  # open batches (any thread's): updates wait for the last to end
_batched_since = 0.0  # when the first of them opened
BATCH_SECONDS = 0.5
"""How long updates wait in a batch at most: a slow start (hosts bootstrapped over SSH) shows its
servlets in ``runmap status`` as they come up, a fast one writes once."""
_waiting: dict[Cluster, None] = {}  # clusters updated meanwhile, in order


def registry_dir() -> Path:
    return runtime_subdir("clusters")


# ---------------------------------------------------------------- writing (the client)


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Within, updates are written once, as the last open batch ends (as things stand then), or
    as they come once the batch has been open ``BATCH_SECONDS``.

    Starting or stopping several servlets at once (a Mapper's replicas) wrote a
    cluster's whole entry again for each, one after another under the lock: two
    replicas' starts and stops each waited 0.5-2 ms more in a short script, and
    a Mapper of 64 replicas wrote 64 growing entries.
    """
    global _batches, _batched_since
    with _lock:
        if _batches == 0:
            _batched_since = time.monotonic()
        _batches += 1
    try:
        yield
    finally:
        with _lock:
            _batches -= 1
            waiting = list(_waiting) if _batches == 0 else []
            if waiting:
                _waiting.clear()
        for cluster in waiting:
            update(cluster)


def update(cluster: Cluster) -> None:
    """Writes ``cluster``'s entry as it stands now (or removes it, once closed); in a batch, as it ends."""
    with _lock:
        if cluster.closed:  # checked under the lock, so a late update never revives a closed entry
            _forget(cluster)
            return
        if _batches and time.monotonic() - _batched_since < BATCH_SECONDS:
            _waiting[cluster] = None
            return
        now = time.time()
        record = _records.get(cluster)
        if record is None:
            path = registry_dir() / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
            record = _records[cluster] = _Record(path, now)
        started = record.servlets_started
        servlets = []
        for s in cluster.servlets:
            described = s.describe()
            local_pid = described["local_pid"]
            described["local_pid_start"] = process_start(local_pid) if local_pid is not None else None
            described["started"] = started.setdefault(s.name, now)
            servlets.append(described)
        for gone in set(started) - {s["name"] for s in servlets}:
            del started[gone]
        entry = {
            "name": cluster.name,
            "kind": cluster.kind,
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "started": record.started,
            "servlets": servlets,
        }
        details = cluster.registry_details()  # a kind's own record (EC2: its instances)
        if details:
            entry["details"] = details
        try:
            _write(record.path, entry)
        except OSError:
            pass  # the registry serves the `runmap` command; it must never fail a cluster


def remove(cluster: Cluster) -> None:
    """Removes ``cluster``'s entry: it is closed."""
    with _lock:
        _forget(cluster)


def _forget(cluster: Cluster) -> None:
    _waiting.pop(cluster, None)
    record = _records.pop(cluster, None)
    if record is not None:
        record.path.unlink(missing_ok=True)
        down_marker(record.path).unlink(missing_ok=True)


def down_marker(path: Path) -> Path:
    """The file ``runmap down`` leaves beside a cluster's entry: its client is to close it."""
    return path.with_suffix(".down")


def shut_down_from_cli(cluster: Cluster) -> bool:
    """Whether ``runmap down`` asked for ``cluster`` to be closed (checked when one of its servlets dies)."""
    with _lock:
        record = _records.get(cluster)
    return record is not None and down_marker(record.path).exists()


def mark_down(entry: ClusterEntry) -> None:
    """Tells the client of ``entry`` that ``runmap down`` ended its cluster (before its servlets are signalled)."""
    try:
        os.close(open_private(down_marker(entry.path), os.O_WRONLY | os.O_CREAT))
    except OSError:
        pass  # the client is gone with its directory: nobody to tell


def _write(path: Path, entry: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp{threading.get_ident()}")
    tmp.unlink(missing_ok=True)  # left by a writer that died: O_EXCL below must create it anew
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w") as f:
        json.dump(entry, f)
    os.replace(tmp, path)


# ------------------------------------------------------------------- reading (the CLI)


@dataclass
class ServletEntry:
    name: str
    env: str
    endpoint: str | None
    host: str | None
    pid: int | None
    local_pid: int | None
    started: float
    log: str | None
    local_pid_start: int | None = None
    cluster: ClusterEntry | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        if self.local_pid is None:
            return self.cluster is not None and self.cluster.client_alive
        return pid_alive(self.local_pid, self.local_pid_start)

    def is_servlet_process(self) -> bool:
        """Whether the recorded local pid is still this servlet's process (not a recycled pid)."""
        if self.local_pid is None:
            return False
        if self.local_pid_start is not None:
            return pid_alive(self.local_pid, self.local_pid_start)
        return SERVLET_COMMAND in command_line(self.local_pid)


@dataclass
class ClusterEntry:
    name: str
    kind: str
    pid: int
    started: float
    servlets: list[ServletEntry]
    path: Path
    pid_start: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def client_alive(self) -> bool:
        return pid_alive(self.pid, self.pid_start)


def load(clean: bool = True) -> list[ClusterEntry]:
    """The clusters on record, oldest first, with only their live servlets.

    With ``clean``, files whose client and servlets are all gone are deleted.
    """
    entries = []
    for path in sorted(registry_dir().glob("*.json")):
        try:
            raw = json.loads(path.read_text())
            entry = ClusterEntry(
                name=str(raw["name"]),
                kind=str(raw["kind"]),
                pid=int(raw["pid"]),
                started=float(raw["started"]),
                servlets=[],
                path=path,
                pid_start=raw.get("pid_start"),
                details=dict(raw.get("details") or {}),
            )
            for s in raw["servlets"]:
                servlet = ServletEntry(**{k: s.get(k) for k in ServletEntry.__dataclass_fields__ if k != "cluster"})
                servlet.cluster = entry
                if servlet.alive:
                    entry.servlets.append(servlet)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced right now, or not ours: skip it
        if not entry.client_alive and not entry.servlets:
            if clean:
                path.unlink(missing_ok=True)
                down_marker(path).unlink(missing_ok=True)
            continue
        entries.append(entry)
    return sorted(entries, key=lambda e: e.started)


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as gone).

    With ``start`` (from :func:`process_start`), a process that got the pid since does not count.
    """
    if start is not None and process_start(pid) not in (None, start):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def process_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux), to tell a recycled pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def command_line(pid: int) -> str:
    """The command line of ``pid``, or ``""`` if it cannot be read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        pass
    import subprocess

    try:
        out = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()
