"""SSHConnection on the three real sshd hosts (tests/sshd_hosts.py): one ControlMaster per host,
verified host keys, sessions, forwards, copies, clean-up, and how a remote command's end is told."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from sshd_hosts import SshHosts

from runmap.cluster import template
from runmap.cluster.ssh.connection import ExitKind, SSHConnection, classify_exit
from runmap.exceptions import ClusterError, HostKeyError

WAIT = 10.0
Connect = Callable[..., SSHConnection]


@pytest.fixture
def control_dir(ssh_hosts: SshHosts) -> Iterator[Path]:
    """A short private directory (Unix socket paths have at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="c", dir=ssh_hosts.client_dir))
    yield path
    left = sorted(p.name for p in path.iterdir())
    for p in path.iterdir():
        p.unlink()
    path.rmdir()
    assert not left, f"the connection left files in its control directory: {left}"


@pytest.fixture
def connect(ssh_hosts: SshHosts, control_dir: Path) -> Iterator[Connect]:
    """Opens connections with the hosts' config; closes whatever the test left open."""
    opened: list[SSHConnection] = []

    def open_(host: str, **options: object) -> SSHConnection:
        options.setdefault("config_file", ssh_hosts.config)
        conn = SSHConnection(host, control_dir=control_dir, **options)  # type: ignore[arg-type]
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        conn.close()


def _children() -> list[psutil.Process]:
    """This process's live descendants, but the template that forks local replicas (conftest.py warms it)."""
    shared = template.current()
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and (shared is None or p.pid != shared.proc.pid):
                alive.append(p)
        except psutil.NoSuchProcess:  # ended between the listing and the look (a master's guard shell)
            pass
    return alive


def _names(processes: list[psutil.Process]) -> list[str]:
    """Their names, but of those that ended meanwhile (a session's last process, leaving)."""
    names = []
    for p in processes:
        try:
            names.append(p.name())
        except psutil.NoSuchProcess:
            pass
    return names


def _config_with(ssh_hosts: SshHosts, tmp_path: Path, known_hosts: Path, extra: str = "") -> Path:
    """The hosts' config, with ``known_hosts`` in place of theirs (and ``extra`` blocks first)."""
    text = ssh_hosts.config.read_text().replace(str(ssh_hosts.known_hosts), str(known_hosts))
    config = tmp_path / "config"
    config.write_text(extra + text)
    config.chmod(0o600)
    return config


def _remote_pid(ssh_hosts: SshHosts, alias: str, marker: str) -> psutil.Process:
    """The host's process whose command line holds ``marker``, once it runs."""
    deadline = time.monotonic() + WAIT
    while True:
        found = []
        for p in ssh_hosts.processes(alias):
            try:
                if marker in " ".join(p.cmdline()) and p.name().startswith("python"):
                    found.append(p)
            except psutil.Error:
                pass
        if len(found) == 1:
            return found[0]
        assert time.monotonic() < deadline, f"{len(found)} processes with {marker!r} on {alias}"
        time.sleep(0.02)


# ---------------------------------------------------------------------- connecting


def test_a_connection_to_each_host_is_one_master_of_ours(ssh_hosts: SshHosts, control_dir: Path) -> None:
    for h in ssh_hosts.hosts:
        with SSHConnection(h.alias, config_file=ssh_hosts.config, control_dir=control_dir) as conn:
            assert conn.alive()
            assert conn.master_pid in {p.pid for p in _children()}
            assert stat.S_ISSOCK(conn.control_path.stat().st_mode)
            assert stat.S_IMODE(conn.control_path.stat().st_mode) == 0o600
            master_ports = {
                c.laddr.port
                for c in psutil.Process(conn.master_pid).net_connections("tcp")
                if c.raddr and c.raddr.port == h.port
            }
            assert len(master_ports) == 1
            for _ in range(2):  # every session goes through the master's one TCP connection
                r = conn.run('id -un; echo "$SSH_CONNECTION"; pwd', check=True)
                user, connection, cwd = r.stdout.decode().splitlines()
                assert (user, cwd) == (h.user, str(h.home))
                assert int(connection.split()[1]) in master_ports
                assert connection.split()[2:] == [h.address, str(h.port)]
        assert not conn.alive() and conn.closed
        assert not _children()
        assert not conn.control_path.exists()
        ssh_hosts.assert_clean(h.alias)


KILLED_CLIENT = """
import sys
from runmap.cluster.ssh.connection import SSHConnection
conn = SSHConnection("host-a", config_file=sys.argv[1], control_dir=sys.argv[2])
print(conn.master_pid, flush=True)
sys.stdin.read()
"""


def test_a_client_killed_outright_leaves_no_master_connected(ssh_hosts: SshHosts, control_dir: Path) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, str(ssh_hosts.config), str(control_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert client.stdout is not None and client.stdin is not None
    try:
        master = psutil.Process(int(client.stdout.readline()))
        assert master.name() == "ssh" and any(p.name() == "sshd" for p in ssh_hosts.processes("host-a"))
        client.kill()  # no close(), no atexit: only the guard's end of the pipe tells
        client.wait(WAIT)
        master.wait(WAIT)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        client.stdin.close()
        client.stdout.close()
    ssh_hosts.assert_clean("host-a", within=WAIT)
    # The master removed its control socket as it ended; only its log stays, as a killed client leaves it.
    left = sorted(p.name for p in control_dir.iterdir())
    assert len(left) == 1 and left[0].endswith(".log"), left
    (control_dir / left[0]).unlink()


def test_a_session_never_logs_in_on_its_own_when_the_master_is_gone(ssh_hosts: SshHosts, connect: Connect) -> None:
    conn = connect("host-b")
    assert conn.master_pid is not None
    master = psutil.Process(conn.master_pid)  # before the kill: reaped at once, its pid is gone
    os.kill(conn.master_pid, signal.SIGKILL)
    master.wait(WAIT)
    assert not conn.alive()
    # Without ProxyCommand=false in the session's options, ssh would log in again by itself.
    r = conn.run("id -un")
    assert r.returncode == 255 and r.stdout == b"", r
    assert "sshd" not in _names(ssh_hosts.processes("host-b"))
    conn.close()
    ssh_hosts.assert_clean("host-b")


def test_an_unknown_host_key_is_refused_with_how_to_accept_it(
    ssh_hosts: SshHosts, connect: Connect, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.touch(mode=0o600)
    config = _config_with(ssh_hosts, tmp_path, empty)
    with pytest.raises(HostKeyError) as info:
        connect("host-a", config_file=config)
    message = str(info.value)
    assert "host-a" in message and "not in known_hosts" in message
    a = ssh_hosts.host("host-a")
    assert f"ssh-keyscan -p {a.port} {a.address}" in message
    assert f"`ssh -F {config} host-a` and answer yes" in message
    assert "accept_new_host_keys=True" in message
    assert "Host key verification failed" in message  # ssh's own words
    assert empty.read_text() == ""
    assert not _children()
    ssh_hosts.assert_clean("host-a")


def test_accept_new_host_keys_records_the_key_then_strict_checking_passes(
    ssh_hosts: SshHosts, connect: Connect, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.touch(mode=0o600)
    config = _config_with(ssh_hosts, tmp_path, known)
    conn = connect("host-a", config_file=config, accept_new_host_keys=True)
    assert conn.run("id -un", check=True).stdout.decode().strip() == "rmhost1"
    conn.close()
    recorded = [line.split() for line in known.read_text().splitlines()]
    assert recorded == [ssh_hosts.host("host-a").known_hosts_line.split()]
    with connect("host-a", config_file=config) as again:  # StrictHostKeyChecking=yes, the key now known
        assert again.alive()


def test_a_changed_host_key_is_refused_even_with_accept_new(
    ssh_hosts: SshHosts, connect: Connect, tmp_path: Path
) -> None:
    wrong = tmp_path / "known_hosts"
    name = ssh_hosts.host("host-a").known_hosts_line.split()[0]  # [127.0.0.2]:22022
    wrong.write_text(f"{name} {ssh_hosts.host('host-b').host_key}\n")
    config = _config_with(ssh_hosts, tmp_path, wrong)
    with pytest.raises(HostKeyError, match="CHANGED") as info:
        connect("host-a", config_file=config, accept_new_host_keys=True)
    assert f"ssh-keygen -R {name}" in str(info.value)
    assert "accept_new_host_keys" not in str(info.value)
    assert not _children()


def test_an_unreachable_host_and_a_refused_login_quote_ssh(
    ssh_hosts: SshHosts, connect: Connect, tmp_path: Path
) -> None:
    port = ssh_hosts.host("host-a").port
    nowhere = f"Host nowhere\n    HostName 127.0.0.5\n    Port {port}\n\n"  # a loopback address with no sshd
    config = _config_with(ssh_hosts, tmp_path, ssh_hosts.known_hosts, nowhere)
    started = time.monotonic()
    with pytest.raises(ClusterError) as info:
        connect("nowhere", config_file=config)
    assert not isinstance(info.value, HostKeyError)
    assert "could not connect to nowhere" in str(info.value)
    assert f"ssh: connect to host 127.0.0.5 port {port}: Connection refused" in str(info.value)
    assert time.monotonic() - started < 5
    # host-a admits rmhost1 only: ssh's "Permission denied" is quoted.
    with pytest.raises(ClusterError, match=r"rmhost2@127\.0\.0\.2: Permission denied \(publickey\)"):
        connect("rmhost2@host-a")
    assert not _children()
    ssh_hosts.assert_clean()


def test_proxy_jump_and_user_of_the_config_are_honoured(
    ssh_hosts: SshHosts, connect: Connect, tmp_path: Path
) -> None:
    a = ssh_hosts.host("host-a")
    jumpy = (
        f"Host jumpy\n    HostName {a.address}\n    Port {a.port}\n    User {a.user}\n    ProxyJump host-b\n"
        f"    IdentityFile {ssh_hosts.client_key}\n    IdentitiesOnly yes\n    IdentityAgent none\n"
        f"    UserKnownHostsFile {ssh_hosts.known_hosts}\n    GlobalKnownHostsFile /dev/null\n\n"
    )
    config = _config_with(ssh_hosts, tmp_path, ssh_hosts.known_hosts, jumpy)
    conn = connect("jumpy", config_file=config)
    assert conn.run("id -un", check=True).stdout.decode().strip() == a.user
    assert ssh_hosts.processes("host-b"), "the jump went through host-b"
    conn.close()
    assert not _children()
    ssh_hosts.assert_clean()


def test_user_at_host_colon_port_and_a_key_without_any_alias(
    ssh_hosts: SshHosts, connect: Connect, tmp_path: Path
) -> None:
    config = tmp_path / "config"  # no Host block for the address: only where known_hosts is
    config.write_text(f"Host *\n    UserKnownHostsFile {ssh_hosts.known_hosts}\n    GlobalKnownHostsFile /dev/null\n"
                      "    IdentityAgent none\n")  # fmt: skip
    b = ssh_hosts.host("host-b")
    conn = connect(f"{b.user}@{b.address}:{b.port}", config_file=config, key=ssh_hosts.client_key)
    assert conn.destination == f"ssh://{b.user}@{b.address}:{b.port}"
    assert conn.run("id -un", check=True).stdout.decode().strip() == b.user
    with pytest.raises(ClusterError, match="Permission denied"):  # the key is what lets it in
        connect(f"{b.user}@{b.address}:{b.port}", config_file=config)


# ---------------------------------------------------------------------- run, put, popen, forward


def test_run_gives_codes_output_and_input_as_subprocess_does(connect: Connect, tmp_path: Path) -> None:
    conn = connect("host-a")
    r = conn.run("echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")  # the wrapper's line is taken out
    r = conn.run("sh -c 'kill -9 $$'")
    assert r.returncode == -9 and b"runmap-exit" not in r.stderr  # as subprocess tells a signal death
    r = conn.run(["sh", "-c", "kill -TERM $$"])
    assert r.returncode == -15
    r = conn.run(["python3", "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read()[::-1])"],
                 input=b"\x00abc\xff")  # fmt: skip
    assert (r.returncode, r.stdout) == (0, b"\xffcba\x00")
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20))
    with big.open("rb") as f:
        r = conn.run("sha256sum", input=f)
    assert r.stdout.split()[0].decode() == hashlib.sha256(big.read_bytes()).hexdigest()
    r = conn.run(["printf", "%s|", "a b", "$HOME", "it's"])  # an argv is quoted for the host's shell
    assert r.stdout == b"a b|$HOME|it's|"
    with pytest.raises(ClusterError, match=r"failed with 4:\nno such thing"):
        conn.run("echo 'no such thing' >&2; exit 4", check=True)


def test_a_run_that_times_out_is_ended_on_the_host(ssh_hosts: SshHosts, connect: Connect) -> None:
    conn = connect("host-c")
    started = time.monotonic()
    with pytest.raises(ClusterError, match="took over 1 s"):
        conn.run("sleep 300; echo never", timeout=1)
    assert time.monotonic() - started < 5
    assert not [p for p in ssh_hosts.processes("host-c") if p.name() == "sleep"]
    assert conn.run("echo still usable", check=True).stdout == b"still usable\n"


def test_put_copies_bytes_and_files_with_a_mode(connect: Connect, tmp_path: Path) -> None:
    conn = connect("host-b")
    conn.put(b"first\n", "~/copied.txt", mode=0o640)
    local = tmp_path / "payload"
    local.write_bytes(os.urandom(1 << 20))
    conn.run("mkdir -p sub", check=True)
    conn.put(local, "sub/payload", mode=0o700)
    r = conn.run("cat copied.txt; stat -c '%a %U' copied.txt sub/payload; sha256sum < sub/payload; ls -A sub")
    lines = r.stdout.decode().splitlines()
    assert lines[:3] == ["first", "640 rmhost2", "700 rmhost2"]
    assert lines[3].split()[0] == hashlib.sha256(local.read_bytes()).hexdigest()
    assert lines[4:] == ["payload"]  # no temporary file left beside it
    with pytest.raises(ClusterError, match="no-such-dir"):
        conn.put(b"x", "no-such-dir/file")
    conn.run("rm -rf copied.txt sub", check=True)


SERVLET_LIKE = """
import json, os, sys
config = json.loads(sys.stdin.readline())
print(json.dumps({"pid": os.getpid(), "got": len(config["token"])}), flush=True)
sys.stdin.read()  # until the session ends
print("stdin closed", file=sys.stderr)
"""


def test_popen_carries_the_token_on_stdin_never_on_a_command_line(
    ssh_hosts: SshHosts, connect: Connect
) -> None:
    conn = connect("host-a")
    token = secrets.token_hex(16)
    proc = conn.popen(["python3", "-c", SERVLET_LIKE])
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(json.dumps({"token": token}).encode() + b"\n")
    proc.stdin.flush()
    ready = json.loads(proc.stdout.readline())
    assert ready["got"] == len(token)
    remote = psutil.Process(ready["pid"])  # the host's pid: the hosts share this machine's pid space
    assert remote.uids().real == ssh_hosts.host("host-a").uid
    everywhere = ssh_hosts.processes("host-a") + [psutil.Process(), *psutil.Process().children(recursive=True)]
    lines = [" ".join(p.cmdline()) for p in everywhere]
    assert any("json.loads(sys.stdin.readline())" in line for line in lines)
    assert not [line for line in lines if token in line]
    assert token.encode() not in Path(f"/proc/{remote.pid}/environ").read_bytes()
    # End of the session's stdin is end of the remote command's stdin.
    proc.stdin.close()
    assert proc.wait(WAIT) == 0
    err = proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    assert err.splitlines() == ["stdin closed"]  # an exit with 0 needs no report: the log stays clean
    assert conn.exit_status(0, err).kind is ExitKind.EXITED
    assert not remote.is_running() or remote.status() == psutil.STATUS_ZOMBIE


def test_killing_the_local_session_ends_the_stdin_of_the_remote_command(
    ssh_hosts: SshHosts, connect: Connect
) -> None:
    conn = connect("host-b")
    proc = conn.popen(["python3", "-c", SERVLET_LIKE, "killed-locally"], stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b'{"token": ""}\n')
    proc.stdin.flush()
    pid = json.loads(proc.stdout.readline())["pid"]
    proc.kill()
    assert proc.wait(WAIT) == -signal.SIGKILL
    assert conn.exit_status(proc.returncode, b"").kind is ExitKind.SIGNALED
    deadline = time.monotonic() + WAIT
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the remote command did not see the end of its stdin"
        time.sleep(0.02)
    proc.stdin.close()
    proc.stdout.close()
    assert conn.alive()


def test_command_is_a_session_the_caller_starts_itself(connect: Connect) -> None:
    conn = connect("host-b")
    argv = conn.command("read line; echo got $line; exit 5")
    assert argv[0].endswith("ssh") and "ControlMaster=no" in argv and f"ControlPath={conn.control_path}" in argv
    r = subprocess.run(argv, input=b"hello\n", capture_output=True, timeout=WAIT, start_new_session=True)
    assert (r.returncode, r.stdout, r.stderr) == (5, b"got hello\n", b"runmap-exit:5\n")
    assert conn.exit_status(r.returncode, r.stderr).code == 5


ECHO_SERVER = """
import os, socket, tempfile
path = os.path.join(tempfile.mkdtemp(), "echo.sock")  # a directory private to the host's user
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(); s.settimeout(30)
print(path, flush=True)
for _ in range(2):
    c, _ = s.accept()
    with c:
        c.sendall(c.recv(4096).upper())
"""


def test_forward_reaches_a_unix_socket_on_the_host(ssh_hosts: SshHosts, connect: Connect, control_dir: Path) -> None:
    conn = connect("host-c")
    server = conn.popen(["python3", "-u", "-c", ECHO_SERVER], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert server.stdout is not None
    remote = server.stdout.readline().decode().strip()
    sock = control_dir / "fwd.sock"
    sock.write_text("stale")  # StreamLocalBindUnlink: a stale file in the way is replaced
    assert conn.forward(sock, remote) == sock
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    for word in (b"hello", b"again"):
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(WAIT)
            c.connect(str(sock))
            c.sendall(word)
            assert c.recv(4096) == word.upper()
    assert server.wait(WAIT) == 0
    server.stdout.close()
    conn.cancel_forward(sock)
    assert not sock.exists()
    conn.cancel_forward(sock)  # twice is fine


def test_close_ends_every_session_and_forward_and_leaves_nothing(
    ssh_hosts: SshHosts, connect: Connect, control_dir: Path
) -> None:
    conn = connect("host-a")
    stubborn = conn.popen("trap '' TERM; sleep 300")  # ignores its stdin's end and SIGTERM
    servlet = conn.popen(["python3", "-c", SERVLET_LIKE])
    assert servlet.stdin is not None and servlet.stdout is not None
    servlet.stdin.write(b'{"token": "t"}\n')
    servlet.stdin.flush()
    assert json.loads(servlet.stdout.readline())["got"] == 1
    conn.run("nohup sleep 301 >/dev/null 2>&1 &", check=True)  # orphaned at once, but tagged
    sock = conn.forward(control_dir / "f.sock", "/nowhere/f.sock")
    # A process of the host's user that another connection started: not this one's to end.
    foreign = ssh_hosts.run("host-a", "nohup sleep 302 >/dev/null 2>&1 </dev/null &")
    assert foreign.returncode == 0, foreign.stderr
    names = {" ".join(p.cmdline()) for p in ssh_hosts.processes("host-a")}
    assert {"sleep 300", "sleep 301", "sleep 302"} <= names, names
    started = time.monotonic()
    conn.close()
    took = time.monotonic() - started
    assert took < 8, took
    assert stubborn.returncode is not None and servlet.returncode is not None
    assert not _children()
    assert not sock.exists() and not conn.control_path.exists()
    left = [" ".join(p.cmdline()) for p in ssh_hosts.processes("host-a")]
    assert left == ["sleep 302"], left  # only what another connection started
    ssh_hosts.kill_processes("host-a")
    ssh_hosts.assert_clean("host-a")
    with pytest.raises(ClusterError, match="closed"):
        conn.run("true")
    conn.close()


# ---------------------------------------------------------------------- how a remote command ended


def test_what_plain_openssh_reports(ssh_hosts: SshHosts, connect: Connect) -> None:
    """The findings of the module docstring, on ssh alone: no wrapper, no runmap."""

    def plain(command: str, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ssh_hosts.ssh_command("host-b", *options) + [command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )

    assert plain("exit 7").returncode == 7
    killed = plain("kill -9 $$", "-o", "LogLevel=INFO")
    assert killed.returncode == 255 and killed.stderr == ""  # a signal death is a silent 255
    verbose = plain("kill -9 $$", "-v")
    assert verbose.returncode == 255
    assert "rtype exit-signal" in verbose.stderr and "KILL" not in verbose.stderr  # not the signal's name
    conn = connect("host-b")  # through a master: the same
    control = ("-o", f"ControlPath={conn.control_path}", "-o", "ControlMaster=no")
    assert plain("exit 7", *control).returncode == 7
    assert plain("kill -9 $$", *control).returncode == 255


def test_an_exit_code_is_reported(connect: Connect) -> None:
    conn = connect("host-a")
    proc = conn.popen("python3 -c 'import sys; sys.exit(7)'", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 7 and err.decode().splitlines() == ["runmap-exit:7"]
    status = classify_exit(proc.returncode, err, conn.alive())
    assert (status.kind, status.code, status.signal) == (ExitKind.EXITED, 7, None)
    assert str(status) == "exit code 7"


def test_sigkill_on_the_host_is_reported_as_sigkill(ssh_hosts: SshHosts, connect: Connect) -> None:
    conn = connect("host-a")
    proc = conn.popen(["python3", "-c", SERVLET_LIKE, "victim"], stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b'{"token": ""}\n')
    proc.stdin.flush()
    pid = json.loads(proc.stdout.readline())["pid"]
    os.kill(pid, signal.SIGKILL)  # the host's pid: the hosts share this machine's pid space
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 137  # 128 + 9, from the wrapper: plain ssh would say 255
    status = conn.exit_status(proc.returncode, err)
    assert (status.kind, status.signal, status.code) == (ExitKind.SIGNALED, 9, None)
    assert str(status) == "SIGKILL(-9)"  # worded as for a local process
    conn.close()
    ssh_hosts.assert_clean("host-a")


def test_a_lost_host_is_reported_as_host_lost(ssh_hosts: SshHosts, connect: Connect) -> None:
    conn = connect("host-c")
    proc = conn.popen(["python3", "-c", SERVLET_LIKE, "orphan"], stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b'{"token": ""}\n')
    proc.stdin.flush()
    pid = json.loads(proc.stdout.readline())["pid"]
    master = psutil.Process(conn.master_pid)
    try:
        ssh_hosts.kill("host-c")
        _, err = proc.communicate(timeout=WAIT)
        # Asked at once, as a cluster does when the session ends: the master may still be exiting.
        status = conn.exit_status(proc.returncode, err)
        assert proc.returncode == 255 and b"runmap-exit" not in err
        assert status.kind is ExitKind.HOST_LOST, status
        address = ssh_hosts.host("host-c").address
        assert f"the connection to host-c ended: Connection to {address} closed by remote host." in str(status)
        master.wait(WAIT)  # reaped by the connection already: its code is the Popen's
        assert not conn.alive() and conn._master is not None and conn._master.returncode == 255
        assert classify_exit(proc.returncode, err, conn.alive()).kind is ExitKind.HOST_LOST
        # Its stdin's end reached the orphaned command: it left on its own.
        deadline = time.monotonic() + WAIT
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the orphaned command still runs"
            time.sleep(0.02)
        conn.close()
        assert not _children()
    finally:
        ssh_hosts.start("host-c")
    ssh_hosts.assert_clean("host-c")


@pytest.mark.parametrize(
    "returncode,tail,alive,expected",
    [
        (0, "runmap-exit:0\n", True, (ExitKind.EXITED, 0, None)),
        (0, "", False, (ExitKind.EXITED, 0, None)),  # the wrapper reports no 0: ssh's 0 is never ambiguous
        (3, "some output\nrunmap-exit:3", False, (ExitKind.EXITED, 3, None)),  # it ended before the host went
        (143, "runmap-exit:143\n", True, (ExitKind.SIGNALED, None, 15)),
        (137, "Traceback ...\nrunmap-exit:137\n", True, (ExitKind.SIGNALED, None, 9)),
        (255, "runmap-exit:0\nan earlier run's marker\n", False, (ExitKind.HOST_LOST, None, None)),
        (255, "", False, (ExitKind.HOST_LOST, None, None)),
        (255, "", True, (ExitKind.SIGNALED, None, None)),  # no wrapper line: killed, by what ssh does not say
        (-9, "", True, (ExitKind.SIGNALED, None, 9)),  # the local ssh was killed
        (5, "", True, (ExitKind.EXITED, 5, None)),  # no wrapper: ssh passes the code on
        (255, "runmap-exit:255\n", True, (ExitKind.EXITED, 255, None)),
    ],
)
def test_classify_exit(returncode: int, tail: str, alive: bool, expected: tuple[object, ...]) -> None:
    status = classify_exit(returncode, tail, alive)
    assert (status.kind, status.code, status.signal) == expected
    assert classify_exit(returncode, tail.encode(), alive) == status
    if status.kind is ExitKind.HOST_LOST or (status.kind is ExitKind.SIGNALED and status.signal is None):
        assert status.cause  # what is known, said in words
