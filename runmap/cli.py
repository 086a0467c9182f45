"""The ``runmap`` command: what runs on this machine, ending it, and reading replicas' logs.

    runmap status [--json]                 clusters, replicas, envs, pids, ports, uptime
    runmap down NAME | --all               end a cluster's servlets (SIGTERM, then SIGKILL)
    runmap logs REPLICA [-f] [-n LINES]    print (and follow) a replica's log

It reads the registry that clusters keep (:mod:`runmap.registry`). ``down``
signals only pids the registry recorded that are still runmap servlets, so a
pid the system has since given to another process is left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from runmap import registry
from runmap.cluster.process import STOP_GRACE  # seconds between SIGTERM and SIGKILL, as every cluster waits
from runmap.logs import LogTail, read_whole
from runmap.paths import runtime_dir
from runmap.server.logfile import ROTATED_SUFFIX

FOLLOW_POLL = 0.2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runmap", description="See and end what runmap runs on this machine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="list clusters and their replicas")
    status.add_argument("--json", action="store_true", help="print the registry as JSON")

    down = commands.add_parser("down", help="end a cluster's servlets")
    target = down.add_mutually_exclusive_group(required=True)
    target.add_argument("name", nargs="?", help="the cluster's name (every cluster of that name)")
    target.add_argument("--all", action="store_true", help="every cluster on record")
    down.add_argument("--grace", type=float, default=STOP_GRACE, help="seconds between SIGTERM and SIGKILL")

    logs = commands.add_parser("logs", help="print a replica's log")
    logs.add_argument("replica", help="the replica's name, as `runmap status` shows it")
    logs.add_argument("--cluster", help="the cluster, when several have a replica of that name")
    logs.add_argument("-n", "--lines", type=int, default=None, help="only the last LINES lines")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what the replica writes")

    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            return cmd_status(args.json)
        if args.command == "down":
            return cmd_down(None if args.all else args.name, args.grace)
        return cmd_logs(args.replica, args.cluster, args.lines, args.follow)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `runmap logs x | head`
        sys.stderr.close()
        return 0


# ------------------------------------------------------------------- status


def cmd_status(as_json: bool = False) -> int:
    entries = registry.load()
    if as_json:
        print(json.dumps([_as_dict(e) for e in entries], indent=2))
        return 0
    if not entries:
        print("no runmap clusters are running")
        return 0
    now = time.time()
    rows = [("CLUSTER", "KIND", "CLIENT", "REPLICA", "ENV", "HOST", "PID", "ADDRESS", "UPTIME")]
    for e in entries:
        client = str(e.pid) if e.client_alive else f"{e.pid} (gone)"
        if not e.servlets:
            rows.append((e.name, e.kind, client, "-", "-", "-", "-", "-", uptime(now - e.started)))
        for s in e.servlets:
            pid = str(s.pid) if s.pid is not None else "-"
            rows.append(
                (e.name, e.kind, client, s.name, s.env, s.host or "-", pid, s.endpoint or "-", uptime(now - s.started))
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for e in entries:
        if e.kind == "ec2" and e.details:
            from runmap.cluster.ec2.status import status_lines

            print("\n".join(["", *status_lines(e.name, e.details, uptime)]))
    return 0


def uptime(seconds: float) -> str:
    """``75`` -> ``"1m15s"``, ``7300`` -> ``"2h01m"``, as ``docker ps`` would say it, but shorter."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _as_dict(e: registry.ClusterEntry) -> dict[str, object]:
    return {
        "name": e.name,
        "kind": e.kind,
        "pid": e.pid,
        "client_alive": e.client_alive,
        "started": e.started,
        "details": e.details,
        "servlets": [
            {k: getattr(s, k) for k in ("name", "env", "host", "pid", "local_pid", "endpoint", "started", "log")}
            for s in e.servlets
        ],
    }


# --------------------------------------------------------------------- down


def cmd_down(name: str | None, grace: float = STOP_GRACE) -> int:
    entries = [e for e in registry.load() if name is None or e.name == name]
    if not entries:
        print(f"no cluster named {name!r} is running" if name else "no runmap clusters are running", file=sys.stderr)
        return 1 if name else 0
    signalled: list[registry.ServletEntry] = []
    for e in entries:
        registry.mark_down(e)  # its client closes the cluster as its servlets end, instead of replacing them
        for s in e.servlets:
            if s.local_pid is None:
                print(f"{e.name}/{s.name}: a {e.kind} servlet on another machine; close its cluster from its client")
            elif not s.is_servlet_process():
                print(f"{e.name}/{s.name}: pid {s.local_pid} is no longer a runmap servlet; left alone")
            elif _signal(s.local_pid, signal.SIGTERM):
                signalled.append(s)
    deadline = time.monotonic() + grace
    while any(s.alive for s in signalled) and time.monotonic() < deadline:
        time.sleep(0.05)
    for s in signalled:
        if s.alive and s.is_servlet_process():
            _signal(s.local_pid, signal.SIGKILL)  # type: ignore[arg-type]
    for e in entries:
        if not e.client_alive:  # else its client removes the entry as it closes the cluster
            e.path.unlink(missing_ok=True)
            registry.down_marker(e.path).unlink(missing_ok=True)
        ended = [s.name for s in signalled if s.cluster is e]
        print(f"{e.name}: ended {len(ended)} servlet(s){': ' + ', '.join(ended) if ended else ''}")
        if e.kind == "ec2" and e.details:
            from runmap.cluster.ec2.status import terminate

            print(f"{e.name}: terminated EC2 instances {', '.join(terminate(e.details)) or '(none launched)'}")
    if name is None:
        print(f"(--all: the clusters of user {_user_name()} on this machine; other users' are not yours to end)")
    return 0


def _user_name() -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
    except (ImportError, KeyError):
        return f"uid {os.getuid()}"


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------- logs


def cmd_logs(replica: str, cluster: str | None = None, lines: int | None = None, follow: bool = False) -> int:
    found = find_log(replica, cluster)
    if found is None:
        where = f" on cluster {cluster!r}" if cluster else ""
        print(f"no log for replica {replica!r}{where}; `runmap status` lists the running ones", file=sys.stderr)
        return 1
    path, servlet = found
    # What the log keeps: the file rotated away at its cap (<replica>.log.1), then the current one,
    # read through a tail that follows the next rotations as the client's own stream does.
    older = read_whole(path.with_name(path.name + ROTATED_SUFFIX))
    tail = LogTail(path)
    try:
        data = older + tail.read_bytes(final=True)
        if lines is not None:
            data = b"".join(data.splitlines(keepends=True)[-lines:]) if lines > 0 else b""
        _out(data)
        while follow and (servlet is None or servlet.alive):
            time.sleep(FOLLOW_POLL)
            _out(tail.read_bytes())
        _out(tail.read_bytes(final=True))
    finally:
        tail.close()
    return 0



def find_log(replica: str, cluster: str | None = None) -> tuple[Path, registry.ServletEntry | None] | None:
    """A replica's log: a running one's from the registry, else the newest file of that name."""
    for e in reversed(registry.load()):
        if cluster is not None and e.name != cluster:
            continue
        for s in e.servlets:
            if s.name == replica and s.log and os.path.exists(s.log):
                return Path(s.log), s
    pattern = f"{cluster or '*'}/{replica}.log"
    candidates = sorted((runtime_dir() / "logs").glob(pattern), key=lambda p: p.stat().st_mtime)
    return (candidates[-1], None) if candidates else None


def _out(data: bytes) -> None:
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
