"""The ``runmap`` command against a real local cluster running in another process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from runmap import registry
from runmap.cli import uptime

CLIENT = textwrap.dedent(
    """
    import sys
    import runmap as rm

    def hello(x):
        print(f"hello from the replica, x={x}")
        return x

    with rm.LocalCluster(name="clitest", stream_logs=False) as c:
        greeter = rm.function(hello).to(c, env=rm.env(name="greeter"))
        greeter(1)
        rm.function(hello).to(c, env=rm.env(name="other"))
        print("ready", flush=True)
        sys.stdin.read()  # until the test closes our stdin
    """
)


def runmap_cmd(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUNMAP_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "runmap.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def client(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A client process holding a local cluster ``clitest`` with two servlets."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "RUNMAP_HOME": str(tmp_path)},
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def servlet_pids(client: subprocess.Popen[str]) -> list[int]:
    """The client's servlets: its children that run one, and those its template forked."""
    pids = []
    for child in psutil.Process(client.pid).children():
        try:
            command = " ".join(child.cmdline())
            if "runmap.server.template" in command:
                pids.extend(forked.pid for forked in child.children())
            elif "runmap.server" in command:
                pids.append(child.pid)
        except psutil.Error:  # ended (a zombie until the client reaps it)
            pass
    return pids


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_status_lists_the_running_cluster(tmp_path: Path, client: subprocess.Popen[str]) -> None:
    out = runmap_cmd(tmp_path, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["CLUSTER", "KIND", "CLIENT", "REPLICA", "ENV", "HOST", "PID", "ADDRESS", "UPTIME"]
    rows = {line.split()[3]: line.split() for line in lines[1:]}
    assert set(rows) == {"greeter", "other"}
    pids = set(servlet_pids(client))
    for row in rows.values():
        assert row[:3] == ["clitest", "local", str(client.pid)]
        assert row[5] == "localhost"
        assert int(row[6]) in pids
        assert row[7].startswith("127.0.0.1:")

    as_json = json.loads(runmap_cmd(tmp_path, "status", "--json").stdout)
    assert [c["name"] for c in as_json] == ["clitest"]
    assert "token" not in json.dumps(as_json)


def test_the_registry_never_holds_the_token(tmp_path: Path, client: subprocess.Popen[str]) -> None:
    files = list((tmp_path / "clusters").glob("*.json"))
    assert len(files) == 1
    text = files[0].read_text()
    assert "token" not in text
    assert (files[0].stat().st_mode & 0o077) == 0


def test_down_all_ends_the_servlets_and_removes_the_entry(tmp_path: Path, client: subprocess.Popen[str]) -> None:
    pids = servlet_pids(client)
    assert len(pids) == 2
    out = runmap_cmd(tmp_path, "down", "--all")
    assert out.returncode == 0, out.stderr
    assert "clitest: ended 2 servlet(s)" in out.stdout
    assert all(gone(pid) for pid in pids)
    assert client.poll() is None  # the client itself is left alone, and closes the cluster
    assert "--all: the clusters of user" in out.stdout
    deadline = time.monotonic() + 10
    while runmap_cmd(tmp_path, "status").stdout.strip() != "no runmap clusters are running":
        assert time.monotonic() < deadline, runmap_cmd(tmp_path, "status").stdout
        time.sleep(0.1)


MAPPING_CLIENT = textwrap.dedent(
    """
    import itertools, time
    import runmap as rm

    def slow(x):
        time.sleep(0.01)
        return x

    with rm.mapper(slow, num_replicas=2) as m:
        try:
            for i, _ in enumerate(m.imap(itertools.count(), chunksize=1, progress=False)):
                if i == 20:
                    print("mapping", flush=True)
        except Exception as exc:
            print(type(exc).__name__, exc, flush=True)
    """
)


def test_down_fails_the_maps_of_the_clusters_it_ends(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", MAPPING_CLIENT],
        stdout=subprocess.PIPE,
        env={**os.environ, "RUNMAP_HOME": str(tmp_path)},
        text=True,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "mapping"
        assert runmap_cmd(tmp_path, "down", "--all").returncode == 0
        said = proc.stdout.readline()
        assert said.startswith("ReplicaDiedError"), said
        assert "shut down from the command line (runmap down)" in said
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_down_by_name_leaves_other_names_alone(tmp_path: Path, client: subprocess.Popen[str]) -> None:
    out = runmap_cmd(tmp_path, "down", "elsewhere")
    assert out.returncode == 1
    assert "no cluster named 'elsewhere'" in out.stderr
    pids = servlet_pids(client)
    assert len(pids) == 2
    assert runmap_cmd(tmp_path, "down", "clitest").returncode == 0
    assert all(gone(pid) for pid in pids)


def test_logs_shows_what_a_replica_printed(tmp_path: Path, client: subprocess.Popen[str]) -> None:
    out = runmap_cmd(tmp_path, "logs", "greeter")
    assert out.returncode == 0, out.stderr
    assert "hello from the replica, x=1" in out.stdout
    assert "hello" not in runmap_cmd(tmp_path, "logs", "other").stdout
    missing = runmap_cmd(tmp_path, "logs", "nobody")
    assert missing.returncode == 1 and "no log for replica 'nobody'" in missing.stderr


def test_the_registry_forgets_clusters_whose_processes_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNMAP_HOME", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    servlet = {"name": "g", "env": "g", "endpoint": "127.0.0.1:1", "host": "localhost", "pid": pid,
               "local_pid": pid, "started": 0.0, "log": None}
    entry = {"name": "ghost", "kind": "local", "pid": pid, "started": 0.0, "servlets": [servlet]}
    path = registry.registry_dir() / "ghost.json"
    path.write_text(json.dumps(entry))
    assert registry.load() == []
    assert not path.exists()


def test_uptime_reads_like_a_duration() -> None:
    assert [uptime(s) for s in (5, 75, 7300, 90000)] == ["5s", "1m15s", "2h01m", "1d01h"]


def test_logs_follow_ends_when_the_replica_does(tmp_path: Path, client: subprocess.Popen[str]) -> None:
    follower = subprocess.Popen(
        [sys.executable, "-m", "runmap.cli", "logs", "greeter", "-f"],
        env={**os.environ, "RUNMAP_HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        line = follower.stdout.readline()
        while "hello from the replica, x=1" not in line:
            assert line, "the log ended without the replica's line"
            line = follower.stdout.readline()
        assert runmap_cmd(tmp_path, "down", "--all").returncode == 0
        assert follower.wait(30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        assert follower.stdout is not None
        follower.stdout.close()


CHATTY = textwrap.dedent(
    """
    import sys
    import runmap as rm

    def chatter(n):
        for i in range(n):
            print(f"line {i:06d} " + "x" * 60)
        return n

    with rm.LocalCluster(name="chatty", stream_logs=False, log_max_bytes=64 * 1024) as c:
        talk = rm.function(chatter).to(c, env=rm.env(name="talker"))
        talk(10)
        print("ready", flush=True)
        sys.stdin.readline()
        talk(int(sys.argv[1]))
        print("said", flush=True)
        sys.stdin.read()
    """
)


def test_logs_shows_what_the_log_keeps_and_follows_it_across_rotations(tmp_path: Path) -> None:
    env = {**os.environ, "RUNMAP_HOME": str(tmp_path)}
    n = 20_000  # ~1.5 MB through a 64 KiB cap: the log rotates some 20 times while it is followed
    client = subprocess.Popen([sys.executable, "-c", CHATTY, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env, text=True)  # fmt: skip
    follower = None
    assert client.stdin is not None and client.stdout is not None
    try:
        assert client.stdout.readline().strip() == "ready"
        follower = subprocess.Popen([sys.executable, "-m", "runmap.cli", "logs", "talker", "-f"], env=env,
                                    stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert follower.stdout is not None
        assert follower.stdout.readline().startswith("line 000000 ")
        # Read as a terminal would, as it comes: a reader that stops reading holds the replica back
        # only so long (runmap/server/logfile.py), then loses lines.
        followed: list[str] = []
        reader = threading.Thread(target=lambda: followed.extend(follower.stdout), name="test-follower-reader")
        reader.start()
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "said"
        # What the log keeps: the rotated file, then the current one, in order (once the servlet's
        # log writer has copied the last lines, which may come a moment after the call returned).
        deadline = time.monotonic() + 10
        while True:
            kept = runmap_cmd(tmp_path, "logs", "talker").stdout.splitlines()
            if (kept and kept[-1].startswith(f"line {n - 1:06d} ")) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        numbers = [int(line.split()[1]) for line in kept]
        assert numbers == list(range(numbers[0], n)) and len(kept) > 64 * 1024 // 80, (len(kept), numbers[:3])
        last = runmap_cmd(tmp_path, "logs", "talker", "-n", "3").stdout.splitlines()
        assert [int(line.split()[1]) for line in last] == [n - 3, n - 2, n - 1]
        assert runmap_cmd(tmp_path, "down", "--all").returncode == 0
        assert follower.wait(30) == 0
        reader.join(10)
        # Every line the replica printed while followed, once, in order, across the rotations.
        assert [int(line.split()[1]) for line in followed] == list(range(1, 10)) + list(range(n))
    finally:
        for proc in (client, follower):
            if proc is not None and proc.poll() is None:
                if proc is client:
                    proc.stdin.close()  # type: ignore[union-attr]
                    try:
                        proc.wait(30)
                        continue
                    except subprocess.TimeoutExpired:
                        pass
                proc.kill()
                proc.wait()
        for proc in (client, follower):
            for pipe in (proc.stdin, proc.stdout) if proc is not None else ():
                if pipe is not None and not pipe.closed:
                    pipe.close()


def test_a_recycled_pid_is_not_taken_for_the_old_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNMAP_HOME", str(tmp_path))
    start = registry.process_start(os.getpid())
    if start is None:
        pytest.skip("no /proc: process start times are unknown here")
    entry = {"name": "old", "kind": "local", "pid": os.getpid(), "pid_start": start + 1, "started": 0.0, "servlets": []}
    path = registry.registry_dir() / "old.json"
    path.write_text(json.dumps(entry))
    assert registry.load() == []
    assert not path.exists()


def test_servlets_elsewhere_are_listed_while_their_client_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNMAP_HOME", str(tmp_path))
    servlet = {"name": "r", "env": "r", "endpoint": "10.0.0.7:9", "host": "10.0.0.7", "pid": 1,
               "local_pid": None, "started": 0.0, "log": None}
    entry = {"name": "far", "kind": "ray", "pid": os.getpid(), "started": 0.0, "servlets": [servlet]}
    (registry.registry_dir() / "far.json").write_text(json.dumps(entry))
    [far] = registry.load()
    assert [s.name for s in far.servlets] == ["r"]
    assert far.servlets[0].alive and far.servlets[0].local_pid is None
