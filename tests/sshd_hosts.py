"""Three real sshd hosts on loopback, for the SSH cluster's tests: the session fixture ``ssh_hosts``.

Each host is its own ``/usr/sbin/sshd -D -e -f <its sshd_config>`` listening on
``127.0.0.{2,3,4}:PORT`` and admitting only its own local user (``rmhost1``, ``rmhost2``,
``rmhost3``, created with useradd if missing, home ``/home/<user>``, shell ``/bin/bash``), by
public key only. Host keys (ed25519, one per host) and one client key are generated per session.
The client side is an OpenSSH config file with the aliases ``host-a``, ``host-b``, ``host-c`` and a
known_hosts file, so ``ssh -F <config> host-a`` logs in with ``StrictHostKeyChecking=yes``.

What the hosts share, since they are one machine: the network namespace (a port a servlet binds on
``127.0.0.1`` of host-a is also on host-b's loopback), ``/tmp``, the pid space and the Python
(Debian's ``/usr/bin/python3``, whose patch version differs from the client's). What they do not
share: the user, so the home directory and whatever a process owned by one user may touch.

The sshd processes are detached from pytest (started through ``sh ... &`` in a new session), so that
a test may kill a host and start it again without its no-leaks check counting the new sshd: the
processes on a host are not descendants of the test, ``SshHosts.processes`` and
``SshHosts.assert_clean`` check them instead. Sessions are serialized by a lock file: a second
pytest session waits for the first one's hosts to go away.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

SSHD = "/usr/sbin/sshd"
PORT = int(os.environ.get("RUNMAP_TEST_SSHD_PORT", "22022"))
HOSTS = (
    ("host-a", "127.0.0.2", "rmhost1"),
    ("host-b", "127.0.0.3", "rmhost2"),
    ("host-c", "127.0.0.4", "rmhost3"),
)
# Root-owned, not group- or world-writable, all the way up: sshd's StrictModes checks every
# directory above an AuthorizedKeysFile, so a directory under /tmp (mode 1777) is refused.
SERVER_BASE = Path("/run")
SERVER_PREFIX = "runmap-test-sshd-"
CLIENT_PREFIX = "runmap-test-sshc-"
LOCK_PATH = SERVER_BASE / "runmap-sshd-hosts.lock"
LOCK_WAIT_SECONDS = 240.0
START_SECONDS = 20.0
SERVER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _sshd_config(host: SshHost, server_dir: Path) -> str:
    return f"""\
ListenAddress {host.address}:{host.port}
HostKey {host.dir}/ssh_host_ed25519_key
PidFile {host.dir}/sshd.pid
AuthorizedKeysFile {server_dir}/authorized_keys/%u
AllowUsers {host.user}
UsePAM no
StrictModes yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PermitUserEnvironment no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
AllowAgentForwarding no
X11Forwarding no
MaxSessions 100
MaxStartups 100
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def _client_config(hosts: tuple[SshHost, ...], key: Path, known_hosts: Path) -> str:
    blocks = []
    for h in hosts:
        blocks.append(
            f"""\
Host {h.alias}
    HostName {h.address}
    Port {h.port}
    User {h.user}
    IdentityFile {key}
    IdentitiesOnly yes
    IdentityAgent none
    UserKnownHostsFile {known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    BatchMode yes
    PasswordAuthentication no
    KbdInteractiveAuthentication no
    ConnectTimeout 10
    LogLevel ERROR
"""
        )
    return "\n".join(blocks)


@dataclass
class SshHost:
    """One sshd host: its alias in the client config, its address, its user."""

    alias: str
    address: str
    port: int
    user: str
    uid: int
    home: Path
    dir: Path  # its sshd_config, host key, pid file and log (root only)
    host_key: str = ""  # "ssh-ed25519 AAAA...", the public half
    sshd: psutil.Process | None = field(default=None, repr=False)

    @property
    def sshd_config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def log(self) -> Path:
        """sshd's stderr (``-e``): one line per connection, key and session at LogLevel VERBOSE."""
        return self.dir / "sshd.log"

    @property
    def known_hosts_line(self) -> str:
        name = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{name} {self.host_key}"


@dataclass
class SshHosts:
    """What the ``ssh_hosts`` fixture returns. ``ssh -F hosts.config host-a`` logs in as rmhost1."""

    hosts: tuple[SshHost, ...]
    config: Path
    known_hosts: Path
    client_key: Path
    client_dir: Path  # private (0700), short: room for ControlPath sockets (108 bytes at most)
    server_dir: Path

    @property
    def aliases(self) -> list[str]:
        return [h.alias for h in self.hosts]

    @property
    def addresses(self) -> list[str]:
        return [h.address for h in self.hosts]

    @property
    def users(self) -> list[str]:
        return [h.user for h in self.hosts]

    @property
    def homes(self) -> list[Path]:
        return [h.home for h in self.hosts]

    def host(self, alias: str) -> SshHost:
        for h in self.hosts:
            if alias in (h.alias, h.address, h.user):
                return h
        raise KeyError(alias)

    def ssh_command(self, alias: str, *args: str) -> list[str]:
        """``ssh -F config [args...] alias``: put options in ``args``, the remote command after."""
        return ["ssh", "-F", str(self.config), *args, alias]

    def run(self, alias: str, command: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Runs ``command`` on the host (through its user's bash), no stdin, output captured."""
        return subprocess.run(
            [*self.ssh_command(alias), command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # ------------------------------------------------------------------ sshd up and down

    def is_up(self, alias: str) -> bool:
        return _alive(self.host(alias).sshd)

    def kill(self, alias: str, *, user_processes: bool = False) -> None:
        """SIGKILLs the host's sshd: its listener and every per-connection sshd under it.

        Open connections to the host are cut (their ssh clients exit with 255 at once) and the host
        refuses new ones until ``start``. The user's processes that those connections ran are left
        running, orphaned, as a cut network would leave them; ``user_processes=True`` kills them
        too (the host crashed).
        """
        host = self.host(alias)
        if host.sshd is not None:
            _kill_sshd_tree(host.sshd)
        host.sshd = None
        if user_processes:
            self.kill_processes(alias)

    def start(self, alias: str) -> None:
        """Starts the host's sshd if it does not run, and returns once it admits a login."""
        host = self.host(alias)
        if _alive(host.sshd):
            return
        host.sshd = _spawn_sshd(host)
        self._wait_login(host, time.monotonic() + START_SECONDS)

    def _wait_login(self, host: SshHost, deadline: float) -> None:
        while True:
            if not _alive(host.sshd):
                pytest.fail(f"sshd of {host.alias} exited at start:\n{_tail(host.log)}")
            try:
                r = subprocess.run(
                    [*self.ssh_command(host.alias, "-o", "ConnectTimeout=2"), "true"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                if r.returncode == 0:
                    return
                why = r.stderr
            except subprocess.TimeoutExpired:
                why = "ssh timed out"
            if time.monotonic() > deadline:
                pytest.fail(f"{host.alias} admitted no login in {START_SECONDS}s: {why}\n{_tail(host.log)}")
            time.sleep(0.02)

    # ------------------------------------------------------------ what runs on a host

    def processes(self, alias: str) -> list[psutil.Process]:
        """Every live process owned by the host's user (an open connection's ``sshd: user@notty`` too)."""
        return _user_processes(self.host(alias).uid)

    def kill_processes(self, alias: str) -> list[psutil.Process]:
        """SIGKILLs every process of the host's user; returns them."""
        procs = self.processes(alias)
        _kill_all(procs)
        return procs

    def assert_clean(self, alias: str | None = None, within: float = 5.0) -> None:
        """Fails, after killing them, if processes of the host's user (all hosts' users if ``alias``
        is None) still run ``within`` seconds from now. Waits, since a closed connection's sshd and
        shell take a moment to exit."""
        aliases = [alias] if alias else self.aliases
        deadline = time.monotonic() + within
        while True:
            left = {a: self.processes(a) for a in aliases}
            left = {a: ps for a, ps in left.items() if ps}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if left:
            described = {a: [_describe(p) for p in ps] for a, ps in left.items()}
            for ps in left.values():
                _kill_all(ps)
            pytest.fail(f"processes left on the hosts: {described}")


# ---------------------------------------------------------------------- processes


def _alive(p: psutil.Process | None) -> bool:
    try:
        return p is not None and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} ({p.username()}): {' '.join(p.cmdline()) or p.name()}"
    except psutil.Error:
        return f"pid {p.pid} (gone)"


def _user_processes(uid: int) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["uids", "status"]):
        try:
            if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def _kill_all(procs: list[psutil.Process], within: float = 5.0) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    deadline = time.monotonic() + within
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)


def _kill_sshd_tree(listener: psutil.Process) -> None:
    """Stops the listener and every sshd under it, top down (a stopped process forks no new
    connection), then SIGKILLs them all. The user's processes below are not touched."""
    frozen: list[psutil.Process] = []
    pending = [listener]
    while pending:
        p = pending.pop()
        try:
            if p.name() != "sshd":
                continue
            p.suspend()
            frozen.append(p)
            pending.extend(p.children())
        except psutil.Error:
            pass
    _kill_all(frozen)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _spawn_sshd(host: SshHost) -> psutil.Process:
    """Starts sshd in the foreground of a detached shell job: its parent is not pytest."""
    script = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
    argv = [SSHD, "-D", "-e", "-f", str(host.sshd_config)]
    r = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(host.log), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=SERVER_ENV,
        start_new_session=True,
        timeout=10,
        check=True,
    )
    try:
        return psutil.Process(int(r.stdout.strip()))
    except psutil.NoSuchProcess:
        pytest.fail(f"sshd of {host.alias} exited at once:\n{_tail(host.log)}")


# ---------------------------------------------------------------------- users and files


def _run(*argv: str) -> None:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        _run("useradd", "--create-home", "--home-dir", f"/home/{name}", "--shell", "/bin/bash",
             "--comment", "runmap test ssh host", name)  # fmt: skip
        pw = pwd.getpwnam(name)
    if pw.pw_shell != "/bin/bash":
        _run("usermod", "--shell", "/bin/bash", name)
    # With UsePAM no, sshd refuses an account whose password starts with "!" (locked), which is
    # how useradd leaves it; "*" is no password but not locked.
    for line in Path("/etc/shadow").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name and fields[1].startswith("!"):
            _run("usermod", "--password", "*", name)
    return pwd.getpwnam(name)


def _reset_home(pw: pwd.struct_passwd) -> Path:
    """Empties the home (caches, venvs, anything an earlier session left) back to /etc/skel."""
    home = Path(pw.pw_dir)
    if home != Path("/home") / pw.pw_name:
        pytest.fail(f"user {pw.pw_name} has home {home}, not /home/{pw.pw_name}: not wiping it")
    if home.is_symlink():
        home.unlink()
    home.mkdir(exist_ok=True)
    for child in home.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    if Path("/etc/skel").is_dir():
        shutil.copytree("/etc/skel", home, symlinks=True, dirs_exist_ok=True)
    for path in [home, *home.rglob("*")]:
        os.lchown(path, pw.pw_uid, pw.pw_gid)
    home.chmod(0o700)
    return home


def _keygen(path: Path, comment: str) -> str:
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(mode)


# ---------------------------------------------------------------------- the session


@contextlib.contextmanager
def _session_lock() -> Iterator[None]:
    """One pytest session at a time owns the hosts (their port, users and homes)."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                    pytest.fail(f"another pytest session (pid {holder}) has held {LOCK_PATH} for "
                                f"{LOCK_WAIT_SECONDS}s: its ssh hosts are still up")  # fmt: skip
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _clear_leftovers(uids: list[int]) -> None:
    """What a session that died (SIGKILL, power cut) left: under the lock, none of it is in use."""
    stale = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            # The listener's title is one string, "sshd: /usr/sbin/sshd -D -e -f <config> [listener] ..."
            if p.info["name"] == "sshd" and f"{SERVER_BASE}/{SERVER_PREFIX}" in " ".join(p.info["cmdline"] or []):
                stale.append(p)
        except psutil.Error:
            pass
    for p in stale:
        _kill_sshd_tree(p)
    for uid in uids:
        _kill_all(_user_processes(uid))
    for d in SERVER_BASE.glob(f"{SERVER_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in Path(tempfile.gettempdir()).glob(f"{CLIENT_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)
    for _, address, _ in HOSTS:
        held = [
            c
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == PORT and c.laddr.ip in (address, "0.0.0.0")
        ]
        if held:
            who = [_describe(psutil.Process(c.pid)) if c.pid else "?" for c in held]
            pytest.fail(f"port {PORT} on {address} is taken by {who}: set RUNMAP_TEST_SSHD_PORT")


def _check_machine() -> None:
    if not os.path.exists(SSHD) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        where = " (.ci/run installs it when sshd is missing)" if os.environ.get("CI") == "true" else ""
        pytest.fail(f"the ssh hosts need OpenSSH: {SSHD} or ssh is missing; "
                    f"run `apt-get install openssh-server openssh-client`{where}", pytrace=False)  # fmt: skip
    if os.geteuid() != 0:
        pytest.fail("the ssh hosts need root (useradd, sshd on loopback)", pytrace=False)


@pytest.fixture(scope="session")
def ssh_hosts() -> Iterator[SshHosts]:
    """Three sshd hosts, host-a/b/c on 127.0.0.2/3/4, users rmhost1/2/3; see the module docstring."""
    with running_hosts() as hosts:
        yield hosts


@contextlib.contextmanager
def running_hosts() -> Iterator[SshHosts]:
    """The hosts of :func:`ssh_hosts`, for a program that is not a test session (benchmarks/)."""
    _check_machine()
    with _session_lock():
        users = [_ensure_user(user) for _, _, user in HOSTS]
        _clear_leftovers([pw.pw_uid for pw in users])
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        server_dir = Path(tempfile.mkdtemp(prefix=SERVER_PREFIX, dir=SERVER_BASE))
        client_dir = Path(tempfile.mkdtemp(prefix=CLIENT_PREFIX))
        hosts: tuple[SshHost, ...] = ()
        try:
            server_dir.chmod(0o755)  # each user reads its authorized_keys from here, as itself
            keys_dir = server_dir / "authorized_keys"
            keys_dir.mkdir(mode=0o755)
            client_key = client_dir / "id_ed25519"
            client_public = _keygen(client_key, "runmap-test-client")
            hosts = tuple(
                SshHost(alias, address, PORT, pw.pw_name, pw.pw_uid, _reset_home(pw), server_dir / alias)
                for (alias, address, _), pw in zip(HOSTS, users, strict=True)
            )
            for h in hosts:
                h.dir.mkdir(mode=0o700)
                h.host_key = _keygen(h.dir / "ssh_host_ed25519_key", h.alias)
                _write(h.sshd_config, _sshd_config(h, server_dir), 0o600)
                _write(keys_dir / h.user, client_public + "\n", 0o644)
            known_hosts = client_dir / "known_hosts"
            _write(known_hosts, "".join(h.known_hosts_line + "\n" for h in hosts), 0o600)
            config = client_dir / "config"
            _write(config, _client_config(hosts, client_key, known_hosts), 0o600)
            ssh = SshHosts(hosts, config, known_hosts, client_key, client_dir, server_dir)
            for h in hosts:
                h.sshd = _spawn_sshd(h)
            deadline = time.monotonic() + START_SECONDS
            for h in hosts:
                ssh._wait_login(h, deadline)
            yield ssh
        finally:
            for h in hosts:
                if h.sshd is not None:
                    _kill_sshd_tree(h.sshd)
            for pw in users:
                procs = _user_processes(pw.pw_uid)
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        p.send_signal(signal.SIGTERM)
                if procs:
                    psutil.wait_procs(procs, timeout=2)
                    _kill_all(procs)
            shutil.rmtree(server_dir, ignore_errors=True)
            shutil.rmtree(client_dir, ignore_errors=True)
