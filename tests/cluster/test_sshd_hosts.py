"""The ssh hosts harness itself (tests/sshd_hosts.py): three real sshd on loopback, used as the SSH
cluster will use them: logins as each host's user, strict host keys, a ControlMaster connection
that multiplexes sessions and forwards a unix socket, and a host killed under an open connection."""

from __future__ import annotations

import contextlib
import shlex
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from processes import assert_all_end
from sshd_hosts import SshHosts

WAIT = 10.0


def _ssh(hosts: SshHosts, alias: str, *args: str, command: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = hosts.ssh_command(alias, *args) + ([command] if command is not None else [])
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def _wait_master(hosts: SshHosts, alias: str, control: tuple[str, ...]) -> int:
    """The master's pid, once ``ssh -O check`` finds it."""
    deadline = time.monotonic() + WAIT
    while True:
        r = _ssh(hosts, alias, *control, "-O", "check")
        if r.returncode == 0:
            # "Master running (pid=1234)"
            return int(r.stderr.split("pid=")[1].split(")")[0])
        assert time.monotonic() < deadline, f"no master on {alias}: {r.stderr}"
        time.sleep(0.05)


def _wait_process(hosts: SshHosts, alias: str, name: str) -> psutil.Process:
    """The one process called ``name`` of the host's user, once it runs (``exec`` takes a moment)."""
    deadline = time.monotonic() + WAIT
    while True:
        found = [p for p in hosts.processes(alias) if p.name() == name]
        if len(found) == 1:
            return found[0]
        assert time.monotonic() < deadline, f"{len(found)} processes {name!r} on {alias}"
        time.sleep(0.02)


@contextlib.contextmanager
def _master(hosts: SshHosts, alias: str, control: tuple[str, ...]) -> Iterator[subprocess.Popen[bytes]]:
    """A ControlMaster in the foreground (``-N``): a child of this test, ended with it."""
    proc = subprocess.Popen(
        hosts.ssh_command(alias, "-o", "ControlMaster=yes", *control, "-N"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_master(hosts, alias, control) == proc.pid
        yield proc
    finally:
        if proc.poll() is None:
            _ssh(hosts, alias, *control, "-O", "exit")
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_each_alias_logs_in_as_its_own_user(ssh_hosts: SshHosts) -> None:
    assert ssh_hosts.aliases == ["host-a", "host-b", "host-c"]
    assert len(set(ssh_hosts.users)) == 3 and len(set(ssh_hosts.addresses)) == 3
    for path, mode in ((ssh_hosts.client_dir, 0o700), (ssh_hosts.config, 0o600), (ssh_hosts.known_hosts, 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    for h in ssh_hosts.hosts:
        r = ssh_hosts.run(h.alias, 'id -un; echo "$HOME"; pwd; echo "$SHELL"; echo "$SSH_CONNECTION"')
        assert r.returncode == 0, r.stderr
        user, home, cwd, shell, connection = r.stdout.splitlines()
        assert (user, home, cwd, shell) == (h.user, str(h.home), str(h.home), "/bin/bash")
        assert connection.split()[2:] == [h.address, str(h.port)]
        assert h.home.is_dir() and h.home.stat().st_uid == h.uid
    # Each host admits its own user only.
    r = _ssh(ssh_hosts, "host-a", "-l", ssh_hosts.host("host-b").user, command="true")
    assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr


def test_each_host_runs_debians_python(ssh_hosts: SshHosts) -> None:
    local = subprocess.run(["/usr/bin/python3", "--version"], capture_output=True, text=True, check=True)
    for alias in ssh_hosts.aliases:
        r = ssh_hosts.run(alias, "python3 --version; command -v python3")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [local.stdout.strip(), "/usr/bin/python3"]


def test_an_unknown_host_key_is_refused(ssh_hosts: SshHosts, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.touch(mode=0o600)
    r = _ssh(ssh_hosts, "host-a", "-o", f"UserKnownHostsFile={empty}", command="true")
    assert r.returncode == 255 and "Host key verification failed" in r.stderr, r.stderr
    assert empty.read_text() == ""  # StrictHostKeyChecking=yes learns nothing
    # Another host's key under host-a's name: refused as a changed key.
    a, b = ssh_hosts.host("host-a"), ssh_hosts.host("host-b")
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"{a.known_hosts_line.split()[0]} {b.host_key}\n")
    r = _ssh(ssh_hosts, "host-a", "-o", f"UserKnownHostsFile={wrong}", command="true")
    assert r.returncode == 255 and "REMOTE HOST IDENTIFICATION HAS CHANGED" in r.stderr, r.stderr


def test_a_control_master_multiplexes_sessions(ssh_hosts: SshHosts) -> None:
    control = ("-o", f"ControlPath={ssh_hosts.client_dir}/cm-mux")
    # ControlPersist backgrounds the master: it is no child of this test, so end it by hand.
    r = _ssh(ssh_hosts, "host-b", "-o", "ControlMaster=yes", *control, "-o", "ControlPersist=60", "-f", "-N")
    assert r.returncode == 0, r.stderr
    master = _wait_master(ssh_hosts, "host-b", control)
    try:
        assert master not in {p.pid for p in psutil.Process().children(recursive=True)}
        ports = {
            c.laddr.port
            for c in psutil.Process(master).net_connections("tcp")
            if c.raddr and c.raddr.port == ssh_hosts.host("host-b").port
        }
        assert len(ports) == 1, ports
        for _ in range(2):
            # ControlMaster=no still connects on its own when no master answers: the port tells.
            r = _ssh(ssh_hosts, "host-b", "-o", "ControlMaster=no", *control, command='echo "$SSH_CONNECTION"')
            assert r.returncode == 0, r.stderr
            assert int(r.stdout.split()[1]) in ports
    finally:
        _ssh(ssh_hosts, "host-b", *control, "-O", "exit")
        assert_all_end([master], within=WAIT, what="the ControlPersist master outlived -O exit")
    ssh_hosts.assert_clean("host-b")


def test_a_forward_through_the_master_reaches_a_server_on_the_hosts_loopback(ssh_hosts: SshHosts) -> None:
    host = ssh_hosts.host("host-c")
    control = ("-o", f"ControlPath={ssh_hosts.client_dir}/cm-fwd")
    local = ssh_hosts.client_dir / "fwd.sock"
    server_code = (
        "import os, socket\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); s.settimeout(30)\n"
        "print(s.getsockname()[1], flush=True)\n"
        "c, _ = s.accept(); c.sendall(f'hello from {os.getuid()} in {os.getcwd()}'.encode()); c.close()\n"
    )
    with _master(ssh_hosts, "host-c", control):
        server = subprocess.Popen(
            [*ssh_hosts.ssh_command("host-c", *control), "python3 -u -c " + shlex.quote(server_code)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            r = _ssh(ssh_hosts, "host-c", *control, "-O", "forward", "-L", f"{local}:127.0.0.1:{port}")
            assert r.returncode == 0, r.stderr
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(WAIT)
                c.connect(str(local))
                got = b"".join(iter(lambda: c.recv(4096), b""))
            assert got.decode() == f"hello from {host.uid} in {host.home}"
            assert server.wait(timeout=WAIT) == 0
            r = _ssh(ssh_hosts, "host-c", *control, "-O", "cancel", "-L", f"{local}:127.0.0.1:{port}")
            assert r.returncode == 0, r.stderr
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()
            server.stdout.close()  # type: ignore[union-attr]
            local.unlink(missing_ok=True)
    ssh_hosts.assert_clean("host-c")


def test_killing_a_host_cuts_its_open_connection(ssh_hosts: SshHosts) -> None:
    control = ("-o", f"ControlPath={ssh_hosts.client_dir}/cm-kill")
    try:
        with _master(ssh_hosts, "host-a", control) as master:
            session = subprocess.Popen(
                [*ssh_hosts.ssh_command("host-a", *control), "echo started; exec sleep 300"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert session.stdout is not None and session.stdout.readline() == "started\n"
                sleeper = _wait_process(ssh_hosts, "host-a", "sleep")
                started = time.monotonic()
                ssh_hosts.kill("host-a")
                assert session.wait(timeout=5) == 255
                assert master.wait(timeout=5) == 255
                assert time.monotonic() - started < 5
            finally:
                if session.poll() is None:
                    session.kill()
                session.wait()
                session.stdout.close()  # type: ignore[union-attr]
        assert not ssh_hosts.is_up("host-a")
        r = ssh_hosts.run("host-a", "true")
        assert r.returncode == 255 and "Connection refused" in r.stderr, r.stderr
        assert ssh_hosts.run("host-b", "true").returncode == 0  # the other hosts are untouched
        # The cut connection's command runs on, orphaned, as after a cut network.
        assert sleeper.is_running() and sleeper.status() != psutil.STATUS_ZOMBIE
        assert sleeper in ssh_hosts.kill_processes("host-a")
    finally:
        ssh_hosts.kill_processes("host-a")
        ssh_hosts.start("host-a")
    r = ssh_hosts.run("host-a", "id -un")
    assert r.returncode == 0 and r.stdout.strip() == ssh_hosts.host("host-a").user, r.stderr
    ssh_hosts.assert_clean("host-a")
