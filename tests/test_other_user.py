"""Another user of the same machine must not reach the client's work.

The attacker is a second local user, created here. They can write a shared
working directory and create directories in the shared temp directory; the
client runs a map from there, as the user it is (root in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from users import ensure_user, run_as

ATTACKER = "rmattacker"

CLIENT = textwrap.dedent(
    """
    import runmap as rm
    print(rm.mapper(lambda n: n * n, num_replicas=2).map(range(6), progress=False))
    """
)


@pytest.fixture
def tmp_open() -> Iterator[Path]:
    """A temp directory other users can reach (pytest's own are private to this user)."""
    path = Path(tempfile.mkdtemp(prefix="runmap-other-user-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stage(tmp_open: Path) -> dict[str, Path]:
    """A shared working directory with a planted ``runmap``, and a shared temp directory."""
    ensure_user(ATTACKER)
    tmp_path = tmp_open
    shared, tmp = tmp_path / "shared", tmp_path / "tmp"
    for d in (shared, tmp):
        d.mkdir()
        d.chmod(0o1777)
    evidence = tmp / "planted-code-ran"
    # The planted package: if any servlet imports it, it leaves evidence (a real attack reads the token).
    run_as(
        ATTACKER,
        f"""
        mkdir -p {shared}/runmap/server
        echo 'open("{evidence}", "w").write("ran")' > {shared}/runmap/__init__.py
        cp {shared}/runmap/__init__.py {shared}/runmap/server/__init__.py
        cp {shared}/runmap/__init__.py {shared}/runmap/server/__main__.py
        """,
    )
    client = tmp_path / "client"
    client.mkdir()
    (client / "client.py").write_text(CLIENT)
    secret = tmp_path / "root-only"
    secret.write_text("secret\n")
    secret.chmod(0o600)
    return {"shared": shared, "tmp": tmp, "evidence": evidence, "client": client / "client.py", "secret": secret}


def run_client(stage: dict[str, Path], **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("RUNMAP_HOME", "XDG_RUNTIME_DIR")}
    return subprocess.run(
        [sys.executable, str(stage["client"])],
        cwd=stage["shared"],  # the client runs from the directory the attacker writes
        env={**base, "TMPDIR": str(stage["tmp"]), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_planted_runmap_in_the_working_directory_is_not_imported(stage: dict[str, Path], tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = run_client(stage, RUNMAP_HOME=str(home))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("[0, 1, 4, 9, 16, 25]")
    assert not stage["evidence"].exists(), "a servlet imported the attacker's runmap"


def test_a_runtime_directory_made_by_another_user_is_refused(stage: dict[str, Path]) -> None:
    hostile = stage["tmp"] / f"runmap-{os.getuid()}"
    run_as(
        ATTACKER,
        f"""
        mkdir -p {hostile}/logs/local {hostile}/clusters
        chmod -R 0777 {hostile}
        for i in 1 2 3 4 5 6 7 8; do ln -s {stage["secret"]} {hostile}/logs/local/lambda_replica_$i.log; done
        ln -s {stage["secret"]} {hostile}/logs/local/lambda.log
        """,
    )
    out = run_client(stage)
    assert out.returncode != 0
    assert f"refusing runmap's runtime directory {hostile}" in out.stderr
    assert f"owned by uid {ensure_user(ATTACKER).pw_uid} ({ATTACKER})" in out.stderr
    assert "Traceback" not in out.stderr.split("UnsafePathError")[-1]  # the error, not a lower library's
    assert stage["secret"].read_text() == "secret\n", "servlet output was written through the symlink"
    assert not stage["evidence"].exists()


def test_a_runtime_directory_open_to_others_is_refused_even_if_it_is_ours(stage: dict[str, Path]) -> None:
    mine = stage["tmp"] / f"runmap-{os.getuid()}"
    mine.mkdir()
    mine.chmod(0o777)
    out = run_client(stage)
    assert out.returncode != 0
    assert "is writable by others (mode 0777)" in out.stderr


def test_log_files_are_not_opened_through_symlinks(tmp_path: Path) -> None:
    from runmap.paths import UnsafePathError, open_private

    target = tmp_path / "target"
    target.write_text("x")
    link = tmp_path / "link.log"
    link.symlink_to(target)
    with pytest.raises(UnsafePathError, match="symlink"):
        open_private(link)
    fd = open_private(tmp_path / "new.log")
    os.close(fd)
    assert (tmp_path / "new.log").stat().st_mode & 0o777 == 0o600


def squat(script: str, *args: str) -> subprocess.Popen[str]:
    """``script`` run as the attacker (with the system's Python), once it says it is listening."""
    squatter = subprocess.Popen(
        ["runuser", "-u", ATTACKER, "--", "/usr/bin/python3", "-c", script, *args], stdout=subprocess.PIPE, text=True
    )
    assert squatter.stdout is not None
    if squatter.stdout.readline() != "listening\n":
        squatter.kill()
        squatter.wait()
        pytest.fail("the attacker's listener did not start")
    return squatter


REACHER = textwrap.dedent(
    """
    import os, socket, sys
    path = sys.argv[1]
    for what, attempt in [("connect", lambda: socket.socket(socket.AF_UNIX).connect(path)),
                          ("plant", lambda: socket.socket(socket.AF_UNIX).bind(path + ".planted"))]:
        try:
            attempt()
            print(what, "ok")
        except OSError as exc:
            print(what, type(exc).__name__)
    """
)


def test_another_user_can_neither_reach_nor_plant_a_local_servlets_socket_file() -> None:
    # The client's way to a local servlet is a socket file in the user's private runtime directory:
    # another user can't connect to it, nor put a listener of their own where the client would look.
    import runmap as rm

    ensure_user(ATTACKER)
    with rm.LocalCluster(name="socket-file") as cluster:
        servlet = rm.function(len).to(cluster).servlet
        path = servlet.endpoint.local
        assert path is not None
        out = subprocess.run(
            ["runuser", "-u", ATTACKER, "--", "/usr/bin/python3", "-c", REACHER, path],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split("\n")
        assert out[:2] == ["connect PermissionError", "plant PermissionError"], out
        assert rm.function(len).to(cluster)("four") == 4

PORT_SQUATTER = textwrap.dedent(
    """
    import socket, sys
    dead, other = int(sys.argv[1]), int(sys.argv[2])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", dead))
    s.listen()
    print("listening", flush=True)
    s.settimeout(20)
    conn, _ = s.accept()
    conn.settimeout(10)
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        chunk = conn.recv(65536)
        if not chunk:
            break
        head += chunk
    conn.close()
    [auth] = [line for line in head.split(b"\\r\\n") if line.lower().startswith(b"authorization:")]
    print(auth.split(b" ", 2)[2].decode(), flush=True)
    # What it learned, tried on the servlet still alive.
    replay = socket.create_connection(("127.0.0.1", other), timeout=10)
    replay.sendall(b"GET /info HTTP/1.1\\r\\nHost: x\\r\\n" + auth + b"\\r\\n\\r\\n")
    print(replay.recv(65536).split(b"\\r\\n")[0].decode(), flush=True)
    """
)


def test_a_dead_servlets_port_taken_by_another_user_learns_nothing_that_opens_another_servlet() -> None:
    # Loopback allows no peer check: after a servlet dies, another user can bind its port, and the next
    # connection to that endpoint (a reconnect, a liveness probe) sends the token to them. Each servlet
    # has a token of its own, so what they receive opens no other servlet.
    import dataclasses

    import psutil

    import runmap as rm

    ensure_user(ATTACKER)
    with rm.LocalCluster(name="squat-tcp") as cluster:
        rm.function(len).to(cluster, env=rm.env(name="doomed"))
        rm.function(len).to(cluster, env=rm.env(name="alive"))
        doomed, alive = sorted(cluster.servlets, key=lambda s: s.name != "doomed")
        endpoint = dataclasses.replace(doomed.endpoint, local=None)  # loopback TCP only
        assert doomed.pid is not None
        victim = psutil.Process(doomed.pid)
        victim.kill()
        victim.wait(timeout=10)
        squatter = squat(PORT_SQUATTER, str(endpoint.address[1]), str(alive.endpoint.address[1]))
        try:
            with pytest.raises(rm.RunmapError):
                endpoint.open_channel().info()  # reaches the squatter, which hangs up
            out, _ = squatter.communicate(timeout=30)
        finally:
            squatter.kill()
            squatter.wait()
        learned, replayed = out.splitlines()
        assert learned == doomed.endpoint.token  # the squatter did receive the dead servlet's token ...
        assert replayed == "HTTP/1.1 401 Unauthorized", replayed  # ... which the live servlet refuses
        assert alive.endpoint.token not in out
        assert rm.function(len).to(cluster, env=rm.env(name="alive"))("four") == 4
