"""One OpenSSH ControlMaster connection per host, and how a remote command ended.

:class:`SSHConnection` runs OpenSSH's own ``ssh`` client, never a Python SSH
library, so a host name means what it means to ``ssh``: the aliases, ``User``,
``Port``, ``IdentityFile`` and ``ProxyJump`` of ``~/.ssh/config`` (or of
``config_file``, given to ``ssh -F``, which then replaces ``~/.ssh/config``).

    SSHConnection("host-a")
      └── ssh -M -N -o ControlPersist=no ... host-a     the master: a child process of this client,
            │  control socket <control_dir>/cm-<id>     in the foreground, with a session of its own
            ├── ssh -S <socket> host-a '<wrapped command>'       run(), popen(), command(): sessions
            ├── ssh -S <socket> -O forward -L <path>:127.0.0.1:<port>      forward(): the master binds
            └── ssh -S <socket> -O exit                                     close()

Every ``ssh`` runs with ``BatchMode=yes`` (never a prompt) and verifies host
keys: ``StrictHostKeyChecking=yes``, or ``accept-new`` when the connection is
made with ``accept_new_host_keys=True`` (a *changed* key is refused either way).
An unknown key is a :class:`~runmap.exceptions.HostKeyError` that says how to
accept it; an unreachable host or a refused login is a
:class:`~runmap.exceptions.ClusterError` quoting what ``ssh`` said. The master
is ready once ``ssh -O check`` answers: the constructor polls for it, up to
its deadline, and fails at once if the master exits.

A session never falls back to a connection of its own: when no master answers
on the control socket, ``ssh -o ControlMaster=no`` would log in again by
itself, so sessions carry ``ProxyCommand=false``, which only such a fallback
would run (it fails). A session gets no terminal (``-T``), no escape character,
no agent or X11 forwarding, and no ``RemoteCommand`` of the config.

How a remote command's end reaches the local ``ssh`` (OpenSSH 9.2, each case
tested in ``tests/cluster/ssh/test_connection.py``):

- **exit code N**: ``ssh`` exits with N, through a master too.
- **killed by a signal** (``SIGKILL``): sshd sends an ``exit-signal`` message,
  but the ``ssh`` client does not pass it on: it exits with **255**, as for a
  connection error, and prints nothing about it (only ``ssh -v`` shows
  ``client_input_channel_req: channel 0 rtype exit-signal``, without the signal).
- **host lost** (its sshd killed, or the connection cut): the master exits
  with 255 ("Connection to ... closed by remote host.") and every session
  through it exits with 255 too, printing nothing. The remote processes are
  not signalled: they see end-of-file on stdin and a closed stdout/stderr.
  A host that stops answering without closing the connection is lost after
  ``ServerAliveInterval`` x ``ServerAliveCountMax`` (15 s x 4) of silence.
- **the local session killed** (``SIGKILL`` to the ``ssh`` of one session): the
  master closes that session's channel, so a remote command that reads its
  stdin sees end-of-file; one that does not runs on, until :meth:`SSHConnection.close`.
  A session's ``ssh`` hands its stdin, stdout and stderr to the master, so the
  local pipes reach end-of-file only once the remote command has ended: end
  that first (as a timed-out :meth:`SSHConnection.run` does), then read to the end.

So a 255 alone cannot tell a signal from a lost host, and neither names the
signal. Every command this module runs is therefore wrapped in a small shell
that reports a non-zero end on stderr, as the last line, and exits with the
same code (an exit with 0 is not ambiguous, and leaves a servlet's log clean)::

    exec env RUNMAP_SSH_SESSION=<id>/<n> /bin/sh -c '"$@"; s=$?; [ "$s" = 0 ] || echo "runmap-exit:$s" >&2; exit "$s"' \
        runmap-session <argv>
    exec env RUNMAP_SSH_SESSION=<id>/<n> /bin/sh -c '(eval "$1"); s=$?; ...' runmap-session '<command line>'

An argv is the wrapper's own child; a command line runs in a subshell, so an
``exit`` or ``exec`` of its own still leaves the wrapper to report (a ``kill $$``
kills the wrapper: ``$$`` is its pid, as in any subshell).
``/bin/sh`` reports a signal death as 128 + the signal, as shells do, so
``runmap-exit:137`` is ``SIGKILL``; an exit code above 128 is read the same way.
The wrapper does not read stdin: the command inherits the session's stdin, and
sees end-of-file when the session ends, which is how a servlet knows to leave.
Nothing secret is on its command line (a servlet's token travels on stdin).
:func:`classify_exit` turns a session's return code, the tail of its stderr and
whether the master still runs into an :class:`~runmap.cluster.process.ExitStatus`.

``RUNMAP_SSH_SESSION`` tags every process a session starts (the environment is
inherited), so :meth:`SSHConnection.close` ends, on the host, whatever the
sessions of this connection left running, even a process that ignores the end
of its stdin or was orphaned: it finds them by that tag in ``/proc/*/environ``
(the host's ``python3`` does the search), asks them to leave (``SIGTERM``),
then kills them. A ``run`` that times out ends its own command the same way.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from runmap.cluster.process import ExitKind, ExitStatus
from runmap.exceptions import ClusterError, ConfigError, HostKeyError
from runmap.paths import SUN_PATH_MAX, open_private, private_dir

__all__ = ["ExitKind", "ExitStatus", "RemoteCommand", "SSHConnection", "classify_exit"]

RemoteCommand = str | Sequence[str]
"""A remote command: a string is a ``/bin/sh`` command line; a sequence is an argv, quoted for it."""

CONNECT_TIMEOUT = 30.0  # seconds for the master to log in
CONTROL_TIMEOUT = 10.0  # seconds for an ``ssh -O`` request to the master
RUN_TIMEOUT = 120.0
LOST_GRACE = 0.5  # seconds exit_status waits for a master that may be going down with its host
CLOSE_EOF_GRACE = 0.5  # seconds a session's processes get at close to leave on their stdin's end...
CLOSE_TERM_GRACE = 2.0  # ... then after SIGTERM (a servlet leaves at once), before SIGKILL
SERVER_ALIVE_INTERVAL = 15  # a silent host is lost after SERVER_ALIVE_INTERVAL * SERVER_ALIVE_COUNT seconds
SERVER_ALIVE_COUNT = 4
SOCKET_SUFFIX = 17  # ssh binds the control socket as "<path>.<16 random characters>", then renames it

EXIT_MARKER = "runmap-exit:"
SESSION_VAR = "RUNMAP_SSH_SESSION"
_REPORT = f's=$?; [ "$s" = 0 ] || echo "{EXIT_MARKER}$s" >&2; exit "$s"'
_WRAPPER_LINE = '(eval "$1"); ' + _REPORT
_WRAPPER_ARGV = '"$@"; ' + _REPORT
_MARKER_RE = re.compile(rf"^{EXIT_MARKER}(\d+)\s*$", re.MULTILINE)
_MARKER_BYTES_RE = re.compile(rf"^{EXIT_MARKER}(\d+)[ \t]*(?:\r?\n|\Z)".encode(), re.MULTILINE)
_MAX_SIGNAL = 64

# What a session or a control request may not inherit from the config: a terminal, an escape
# character, forwardings, a command of its own, or a connection of its own (see the docstring).
_SESSION_OPTIONS = (
    "-T",
    "-e", "none",
    "-o", "ControlMaster=no",
    "-o", "ProxyCommand=false",
    "-o", "BatchMode=yes",
    "-o", "LogLevel=ERROR",
    "-o", "RemoteCommand=none",
    "-o", "RequestTTY=no",
    "-o", "ForwardAgent=no",
    "-o", "ForwardX11=no",
    "-o", "ClearAllForwardings=yes",
    "-o", "PermitLocalCommand=no",
)  # fmt: skip

# On the host, run by its python3: ends the processes whose environment carries a session tag
# (argv: the tag, "prefix" or "exact", seconds to wait for them to leave on their own, then after SIGTERM).
_SWEEP = r"""
import os, signal, sys, time
tag = sys.argv[1].encode(); prefix = sys.argv[2] == "prefix"; grace, term_grace = map(float, sys.argv[3:5])
var = b"RUNMAP_SSH_SESSION="
me, uid = os.getpid(), os.getuid()
def tagged():
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.stat("/proc/" + name).st_uid != uid:
                continue
            with open("/proc/" + name + "/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(var):
                value = item[len(var):]
                if value == tag or (prefix and value.startswith(tag + b"/")):
                    found.append(int(name))
                break
    return found
def wait(seconds):
    deadline = time.monotonic() + seconds
    while True:
        left = tagged()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)
left = wait(grace)
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in left:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    left = wait(term_grace if sig == signal.SIGTERM else 1.0)
print(len(left))
"""


def remote_python(python: str, script: str, *args: str, isolated: bool = True) -> str:
    """A command line running ``script`` with the host's ``python``: the script travels base64-encoded
    on one line, so any login shell takes it whole; ``args`` are its ``sys.argv[1:]``."""
    code = base64.b64encode(script.encode()).decode()
    flags = "-I " if isolated else ""
    bootstrap = f"import base64;exec(base64.b64decode('{code}'))"
    return f"{shlex.quote(python)} {flags}-c {shlex.quote(bootstrap)} " + " ".join(shlex.quote(a) for a in args)


_HOST_PORT_RE = re.compile(r"^(?P<user>[^@\s/]+@)?(?P<host>\[[^\]\s]+\]|[^:@\s/\[\]]+):(?P<port>\d{1,5})$")


def destination(host: str) -> str:
    """``host`` as ``ssh`` takes it: ``user@host:port`` (which ssh reads as a host name with a
    colon) becomes ``ssh://user@host:port``; aliases, ``host`` and ``user@host`` stay as they are."""
    m = _HOST_PORT_RE.match(host)
    if m is None:
        return host
    return f"ssh://{m.group('user') or ''}{m.group('host')}:{m.group('port')}"


def _command_line(command: RemoteCommand) -> str:
    if isinstance(command, str):
        return command
    return " ".join(shlex.quote(str(a)) for a in command)


def wrap(command: RemoteCommand, tag: str | None) -> str:
    """``command`` in the exit-reporting wrapper (see the module docstring), tagged with ``tag``.

    An argv runs as the wrapper's own child (``"$@"``); a command line runs in a subshell
    (``(eval "$1")``), one ``sh`` more, so that its ``exit`` or ``exec`` still lets the wrapper report.
    """
    if isinstance(command, str):
        line = f"/bin/sh -c {shlex.quote(_WRAPPER_LINE)} runmap-session {shlex.quote(command)}"
    else:
        if not command:
            raise ConfigError("an empty argv")
        line = f"/bin/sh -c {shlex.quote(_WRAPPER_ARGV)} runmap-session {_command_line(command)}"
    if tag is not None:
        line = f"env {SESSION_VAR}={shlex.quote(tag)} {line}"
    # ``exec``: the login shell (whatever it is) becomes the wrapper, one process less per session.
    return "exec " + line


def classify_exit(returncode: int, stderr_tail: str | bytes, master_alive: bool) -> ExitStatus:
    """How a command run through :class:`SSHConnection` ended.

    Args:
        returncode: the local ``ssh`` session's return code (negative: it was
            killed by that signal, on this machine).
        stderr_tail: the last lines of the session's stderr (its log), where
            the wrapper's ``runmap-exit:<code>`` line is, if it got to write one
            (it writes none for an exit with 0).
        master_alive: whether the connection's master still runs
            (:meth:`SSHConnection.alive`), asked after the session ended.

    Returns:
        ``EXITED`` with the remote code; ``SIGNALED`` with the signal that killed
        the remote command (``signal=None`` when ssh's 255 says only that something
        was killed); ``HOST_LOST`` when the session ended with the connection.

    A marker counts only if its code is the session's return code: the wrapper
    exits with the code it reports, so a marker that disagrees was written by an
    earlier run into the same log.
    """
    text = stderr_tail.decode(errors="replace") if isinstance(stderr_tail, bytes) else stderr_tail
    markers = _MARKER_RE.findall(text)
    if markers and int(markers[-1]) == returncode:
        code = returncode
        if 128 < code <= 128 + _MAX_SIGNAL:
            # No cause: ``str()`` then words it as for a local process, ``SIGKILL(-9)``.
            return ExitStatus(ExitKind.SIGNALED, signal=code - 128)
        return ExitStatus(ExitKind.EXITED, code=code)
    said = _ssh_said(text)
    if returncode < 0:
        sig = -returncode
        return ExitStatus(
            ExitKind.SIGNALED,
            signal=sig,
            cause=f"the local ssh session was killed by {_signal_name(sig)}; the remote command was cut off",
        )
    if returncode == 255:
        if not master_alive:
            return ExitStatus(ExitKind.HOST_LOST, cause=said or "the SSH connection to the host ended")
        return ExitStatus(
            ExitKind.SIGNALED,
            # The wrapper reports a remote command's signal death itself (128 + N), so a bare
            # 255 is the session ending around it: its local ssh was signalled (`runmap down`
            # sends SIGTERM, which ssh turns into 255) or its shell on the host was killed.
            cause="its SSH session ended before the servlet's exit was reported (ssh exited with 255): "
            "the session was ended on this machine (`runmap down`, a signal) or its shell on the host was killed"
            + (f"; ssh said: {said}" if said else ""),
        )
    return ExitStatus(ExitKind.EXITED, code=returncode)


# The master runs under a guard shell that ends it when the client's end of the guard's stdin
# closes: a client killed outright (SIGKILL, OOM) leaves no ssh master connected behind it.
# (``ssh -N`` does not read stdin, and a death signal would follow the thread that forked, not
# the process.) The guard exits with ssh's status, so the master's end is still seen at once.
MASTER_GUARD = """
exec 3<&0
"$@" </dev/null >/dev/null 3<&- &
ssh_pid=$!
echo "$ssh_pid"
exec 1>/dev/null
{ read -r _ <&3; kill -TERM "$ssh_pid" 2>/dev/null; } &
guard_pid=$!
exec 3<&-
wait "$ssh_pid"
status=$?
kill "$guard_pid" 2>/dev/null
exit "$status"
"""


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _ssh_said(text: str) -> str:
    """The last line of ``text`` that is not the wrapper's marker, stripped."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _MARKER_RE.match(line)]
    return lines[-1] if lines else ""


class SSHConnection:
    """A ControlMaster connection to ``host``, owned by this process; see the module docstring.

    Args:
        host: a host as ``ssh`` takes it: an alias of the ssh config, ``host``, ``user@host``,
            or ``user@host:port`` (given to ssh as ``ssh://user@host:port``).
        config_file: an OpenSSH client config given to ``ssh -F`` (it replaces ``~/.ssh/config``).
        key: a private key file to log in with (``-i``, and only it: ``IdentitiesOnly=yes``).
        accept_new_host_keys: trust and record the key of a host seen for the first time
            (``StrictHostKeyChecking=accept-new``); by default an unknown key is refused.
        control_dir: a private directory for the control socket and the master's log; its path
            must be short (a Unix socket's path has at most 107 bytes).
        connect_timeout: seconds for the master to log in.

    Raises:
        HostKeyError: the host's key is unknown (and not accepted) or has changed.
        ClusterError: the host cannot be reached or refused the login; the message quotes ssh.
        ConfigError: a bad host name, key file or control directory.

    The connection is a context manager; :meth:`close` ends it and everything started through it.
    """

    def __init__(
        self,
        host: str,
        *,
        config_file: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        accept_new_host_keys: bool = False,
        control_dir: Path,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        if not host or host.startswith("-") or any(c.isspace() for c in host):
            raise ConfigError(f"not a host name ssh can take: {host!r}")
        self.host = host
        self.destination = destination(host)
        self.config_file = os.fspath(config_file) if config_file is not None else None
        self.key = os.fspath(key) if key is not None else None
        if self.config_file is not None and not os.path.isfile(self.config_file):
            raise ConfigError(f"ssh config file {self.config_file} does not exist")
        if self.key is not None and not os.path.isfile(self.key):
            raise ConfigError(f"ssh key file {self.key} does not exist")
        self.accept_new_host_keys = accept_new_host_keys
        self._ssh = shutil.which("ssh")
        if self._ssh is None:
            raise ClusterError("OpenSSH's ssh client is not installed (apt-get install openssh-client)")
        control_dir = private_dir(Path(control_dir), what="runmap's ssh control directory")
        self.id = secrets.token_hex(4)
        self.control_path = control_dir / f"cm-{self.id}"
        if len(os.fsencode(self.control_path)) + SOCKET_SUFFIX > SUN_PATH_MAX:
            raise ConfigError(
                f"the ssh control directory {control_dir} is too long for a socket path "
                f"(at most {SUN_PATH_MAX - SOCKET_SUFFIX - 12} bytes): use a shorter one"
            )
        self._log_path = control_dir / f"cm-{self.id}.log"
        self._lock = threading.Lock()
        self._sessions: list[subprocess.Popen[bytes]] = []
        self._forwards: dict[Path, str] = {}
        self._seq = 0
        self._closed = False
        self._master: subprocess.Popen[bytes] | None = None  # the guard shell, whose child is ssh
        self._ssh_pid: int | None = None
        self._start_master(connect_timeout)

    # ------------------------------------------------------------------ ssh's arguments

    def _base(self) -> list[str]:
        assert self._ssh is not None
        argv = [self._ssh]
        if self.config_file is not None:
            argv += ["-F", self.config_file]
        return argv

    def _master_argv(self, connect_timeout: float) -> list[str]:
        argv = self._base()
        if self.key is not None:
            argv += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        strict = "accept-new" if self.accept_new_host_keys else "yes"
        argv += [
            "-M", "-N", "-T",
            "-o", "ControlMaster=yes",
            "-o", f"ControlPath={self.control_path}",
            "-o", "ControlPersist=no",
            "-o", "BatchMode=yes",
            "-o", f"StrictHostKeyChecking={strict}",
            "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
            "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
            "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT}",
            "-o", "StreamLocalBindUnlink=yes",
            "-o", "StreamLocalBindMask=0177",
            "-o", "ClearAllForwardings=yes",
            "-o", "ForwardAgent=no",
            "-o", "ForwardX11=no",
            "-o", "PermitLocalCommand=no",
            "-o", "RemoteCommand=none",
            "-o", "LogLevel=INFO",
            self.destination,
        ]  # fmt: skip
        return argv

    def _session_argv(self, remote_line: str) -> list[str]:
        control = f"ControlPath={self.control_path}"
        return [*self._base(), *_SESSION_OPTIONS, "-o", control, self.destination, remote_line]

    def _control_argv(self, operation: str, *extra: str) -> list[str]:
        return [
            *self._base(),
            "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
            "-o", f"ControlPath={self.control_path}",
            "-O", operation,
            *extra,
            self.destination,
        ]  # fmt: skip

    def _control(
        self, operation: str, *extra: str, timeout: float = CONTROL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                self._control_argv(operation, *extra),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess([], 255, "", f"ssh -O {operation} took over {timeout} s")

    # ------------------------------------------------------------------ the master

    def _start_master(self, connect_timeout: float) -> None:
        log_fd = open_private(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self._master = subprocess.Popen(
                ["sh", "-c", MASTER_GUARD, "runmap-ssh-master", *self._master_argv(connect_timeout)],
                stdin=subprocess.PIPE,  # never written: its end (this process's) ends the master
                stdout=subprocess.PIPE,  # the guard says ssh's pid, and closes it
                stderr=log_fd,
                start_new_session=True,  # a Ctrl-C in the terminal is the client's to handle, not ssh's
            )
        finally:
            os.close(log_fd)
        assert self._master.stdout is not None
        with self._master.stdout:
            self._ssh_pid = int(self._master.stdout.readline() or 0) or None
        deadline = time.monotonic() + connect_timeout + 5
        try:
            while True:
                code = self._master.poll()
                if code is not None:
                    raise self._connect_error(code)
                # The master creates its socket once logged in; only then is ``-O check`` worth a process.
                if self.control_path.exists() and self._control("check").returncode == 0:
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"could not connect to {self.host} within {connect_timeout:.0f} s"
                        + (f"; ssh said: {self._master_said()}" if self._master_said() else "")
                    )
                try:
                    self._master.wait(0.02)  # returns at once if the master exits
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            self._end_master()
            self._cleanup_files()
            self._closed = True
            raise

    def _master_said(self, lines: int = 20) -> str:
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return ""
        kept = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("@")]
        return "\n".join(kept[-lines:])

    def _connect_error(self, code: int) -> ClusterError:
        said = self._master_said()
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in said or "has changed and you have requested strict" in said:
            return HostKeyError(
                f"refusing to connect to {self.host}: its host key has CHANGED since it was recorded in "
                f"known_hosts. This may be an attack (someone in between); if the host was reinstalled, check "
                f"the new key's fingerprint with its administrator, remove the old one with "
                f"`ssh-keygen -R {self._known_hosts_name()}` and accept the new one. ssh said:\n{said}"
            )
        if "Host key verification failed" in said or "host key is known" in said:
            hostname, port = self._resolved()
            port_arg = f"-p {port} " if port != "22" else ""
            login = shlex.join(["ssh", *(["-F", self.config_file] if self.config_file else []), self.destination])
            return HostKeyError(
                f"refusing to connect to {self.host}: its host key is not in known_hosts and "
                f"StrictHostKeyChecking=yes refuses an unknown key. To trust it, either add it after checking "
                f"its fingerprint: `ssh-keyscan {port_arg}{hostname} >> ~/.ssh/known_hosts` "
                f"(or the config's UserKnownHostsFile), or log in once with `{login}` and answer yes, "
                f"or pass accept_new_host_keys=True to record the key of a host seen for the first time. "
                f"ssh said:\n{said}"
            )
        return ClusterError(f"could not connect to {self.host}: ssh exited with {code}: {said or '(it said nothing)'}")

    def _resolved(self) -> tuple[str, str]:
        """The host name and port ``ssh`` resolves ``host`` to (``ssh -G``), for the messages."""
        try:
            r = subprocess.run([*self._base(), "-G", self.destination], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return self.host, "22"
        found = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
        return found.get("hostname", self.host), found.get("port", "22")

    def _known_hosts_name(self) -> str:
        hostname, port = self._resolved()
        return hostname if port == "22" else f"[{hostname}]:{port}"

    @property
    def master_pid(self) -> int | None:
        """The pid of the ssh master (under its guard shell, :data:`MASTER_GUARD`)."""
        return self._ssh_pid if self._master is not None else None

    def alive(self) -> bool:
        """Whether the master runs and answers ``ssh -O check`` (False once the host is lost)."""
        if self._closed or self._master is None or self._master.poll() is not None:
            return False
        return self._control("check").returncode == 0

    def exit_status(self, returncode: int, stderr_tail: str | bytes) -> ExitStatus:
        """:func:`classify_exit` for a session of this connection; a lost host is told with ssh's own words.

        A bare 255 (no wrapper line) while the master still runs is asked again after up to
        :data:`LOST_GRACE` seconds, in case the master was about to notice the host gone.
        """
        if self._closed:
            # runmap closed the connection (its cluster is closing): that is no lost host.
            return classify_exit(returncode, stderr_tail, master_alive=True)
        status = classify_exit(returncode, stderr_tail, self.alive())
        if status.kind is ExitKind.SIGNALED and status.signal is None and self._master is not None:
            # A bare 255 while the master still answered: it may be on its way out with the host.
            try:
                self._master.wait(LOST_GRACE)
            except subprocess.TimeoutExpired:
                pass
            status = classify_exit(returncode, stderr_tail, self.alive())
        if status.kind is ExitKind.HOST_LOST and self._closed:
            # runmap closed the connection while this session's end was being looked at (a cluster
            # closing after `runmap down` ended its first servlet): no lost host either.
            return classify_exit(returncode, stderr_tail, master_alive=True)
        if status.kind is ExitKind.HOST_LOST:
            said = self._master_said(3)
            cause = f"the connection to {self.host} ended" + (f": {said}" if said else "")
            return ExitStatus(ExitKind.HOST_LOST, cause=cause)
        return status

    # ------------------------------------------------------------------ sessions

    def _tag(self) -> str:
        with self._lock:
            self._seq += 1
            return f"{self.id}/{self._seq}"

    def _check_open(self) -> None:
        if self._closed:
            raise ClusterError(f"the connection to {self.host} is closed")

    def command(self, remote_cmd: RemoteCommand) -> list[str]:
        """The local argv of a session running ``remote_cmd`` through the master, wrapped to report its end.

        For a caller that starts the process itself (``subprocess.Popen``); :meth:`close`
        still ends what it runs on the host, but not the local ``ssh`` (the master's end ends it).
        """
        self._check_open()
        return self._session_argv(wrap(remote_cmd, self._tag()))

    def popen(
        self,
        remote_cmd: RemoteCommand,
        *,
        stdin: int | IO[Any] | None = subprocess.PIPE,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> subprocess.Popen[bytes]:
        """A session running ``remote_cmd`` on the host, through the master.

        Give a servlet its configuration and token on ``stdin``, never on the command line.
        The remote command sees end-of-file on its stdin when the session ends; stderr gets
        the wrapper's ``runmap-exit:<code>`` line last unless it exits with 0 (see :func:`classify_exit`). The local
        ``ssh`` runs in a session of its own and is ended by :meth:`close` if it still runs.
        """
        argv = self.command(remote_cmd)
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True)
        with self._lock:
            self._sessions = [p for p in self._sessions if p.poll() is None]
            self._sessions.append(proc)
        return proc

    def run(
        self,
        remote_cmd: RemoteCommand,
        input: bytes | IO[bytes] | None = None,
        timeout: float = RUN_TIMEOUT,
        *,
        check: bool = False,
    ) -> subprocess.CompletedProcess[bytes]:
        """Runs ``remote_cmd`` on the host through the master and waits for it.

        Args:
            remote_cmd: a ``/bin/sh`` command line, or an argv.
            input: bytes for its stdin, or a file opened for reading (streamed); else ``/dev/null``.
            timeout: seconds; past them the command is ended on the host too.
            check: raise :class:`ClusterError` (quoting its stderr) if it does not exit with 0.

        Returns:
            its stdout and stderr (without the wrapper's line), and a return code as
            ``subprocess`` gives one: the exit code, ``-N`` if signal N killed it,
            255 if ssh itself failed (the stderr says why).

        Raises:
            ClusterError: it outlived ``timeout``, or ``check`` and it failed.
        """
        self._check_open()
        tag = self._tag()
        argv = self._session_argv(wrap(remote_cmd, tag))
        feed = input if isinstance(input, bytes) else None
        stdin: Any = subprocess.PIPE if feed is not None else (input if input is not None else subprocess.DEVNULL)
        with subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            try:
                out, err = proc.communicate(feed, timeout=timeout)
            except subprocess.TimeoutExpired:
                # The master holds the session's pipes (ssh passes its fds to the master), so they
                # close only once the remote command has gone: end it there first.
                self._sweep(tag, exact=True, grace=0.0, term_grace=0.0)
                proc.kill()
                try:
                    proc.communicate(timeout=CONTROL_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
                raise ClusterError(
                    f"{_command_line(remote_cmd)[:200]!r} on {self.host} took over {timeout:g} s; it was ended"
                ) from None
        code, err = _strip_marker(proc.returncode, err)
        result = subprocess.CompletedProcess(argv, code, out, err)
        if check and code != 0:
            raise ClusterError(
                f"{_command_line(remote_cmd)[:200]!r} on {self.host} failed with {code}:\n"
                + err.decode(errors="replace")[-2000:]
            )
        return result

    def put(
        self,
        source: bytes | str | os.PathLike[str],
        remote_path: str,
        *,
        mode: int = 0o600,
        timeout: float = RUN_TIMEOUT,
    ) -> None:
        """Copies ``source`` (bytes, or a local file's path) to ``remote_path`` on the host, through the master.

        ``remote_path`` is absolute, relative to the remote home, or starts with ``~/``. The file
        is written beside its destination and renamed into place (no half-written file is ever
        seen there), with ``mode``. The parent directory must exist.
        """
        path = remote_path[2:] if remote_path.startswith("~/") else remote_path
        quoted = shlex.quote(path)
        script = (
            f'umask 077 && t={quoted}.runmap-$$ && cat > "$t" && chmod {mode:o} "$t" && mv -f "$t" {quoted}'
            f' || {{ s=$?; rm -f "$t"; exit $s; }}'
        )
        if isinstance(source, bytes):
            self.run(script, input=source, timeout=timeout, check=True)
            return
        with open(source, "rb") as f:
            self.run(script, input=f, timeout=timeout, check=True)

    # ------------------------------------------------------------------ forwards

    def forward(self, local_socket_path: Path, remote_socket_path: str) -> Path:
        """Forwards the Unix socket ``local_socket_path`` to the Unix socket ``remote_socket_path`` on the host.

        The master binds the local socket (mode 0600, replacing a stale file:
        ``StreamLocalBindUnlink``); every connection to it is a channel of the
        master to the host's socket file, which sshd opens as the host's user.
        """
        self._check_open()
        spec = ":".join(_socket_path(p) for p in (local_socket_path, remote_socket_path))
        r = self._control("forward", "-L", spec)
        if r.returncode != 0:
            raise ClusterError(f"could not forward {local_socket_path} to {remote_socket_path} on {self.host}: "
                               f"{r.stderr.strip() or 'ssh -O forward failed'}")  # fmt: skip
        with self._lock:
            self._forwards[Path(local_socket_path)] = spec
        return Path(local_socket_path)

    def cancel_forward(self, local_socket_path: Path) -> None:
        """Ends a :meth:`forward` and removes its socket (ssh leaves the file). Safe to call twice."""
        with self._lock:
            spec = self._forwards.pop(Path(local_socket_path), None)
        if spec is not None and self._master is not None and self._master.poll() is None:
            self._control("cancel", "-L", spec)
        Path(local_socket_path).unlink(missing_ok=True)

    # ------------------------------------------------------------------ closing

    def _sweep(self, tag: str, *, exact: bool, grace: float, term_grace: float) -> None:
        """Ends, on the host, the processes tagged ``tag`` (or ``tag/*``); see the module docstring.

        They get ``grace`` seconds to leave on their own, then ``term_grace`` after SIGTERM, then SIGKILL.
        """
        if self._master is None or self._master.poll() is not None:
            return
        script = remote_python("python3", _SWEEP, tag, "exact" if exact else "prefix", str(grace), str(term_grace))
        try:
            subprocess.run(
                self._session_argv(f"command -v python3 >/dev/null 2>&1 && {script}"),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=grace + term_grace + 15,
            )
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Ends the connection and everything started through it. Safe to call twice.

        Sessions get end-of-file on stdin first (a servlet's signal to leave); what still runs
        on the host after :data:`CLOSE_EOF_GRACE` is sent SIGTERM, and SIGKILL after
        :data:`CLOSE_TERM_GRACE`; then the local sessions, the master, its control socket and
        the forwarded sockets go.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions, self._sessions = self._sessions, []
            forwards, self._forwards = dict(self._forwards), {}
        try:
            for proc in sessions:
                if proc.stdin is not None:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
            self._sweep(self.id, exact=False, grace=CLOSE_EOF_GRACE, term_grace=CLOSE_TERM_GRACE)
        finally:
            for proc in sessions:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
            self._end_master()
            for path in forwards:
                path.unlink(missing_ok=True)
            self._cleanup_files()

    def _end_master(self) -> None:
        master = self._master
        if master is None:
            return
        if master.poll() is None:
            self._control("exit", timeout=5)
            try:
                master.wait(5)
            except subprocess.TimeoutExpired:
                _signal_group(master, signal.SIGTERM)  # the guard and ssh: a session of their own
                try:
                    master.wait(5)
                except subprocess.TimeoutExpired:
                    _signal_group(master, signal.SIGKILL)
                    master.wait()
        if master.stdin is not None:
            master.stdin.close()

    def _cleanup_files(self) -> None:
        self.control_path.unlink(missing_ok=True)
        self._log_path.unlink(missing_ok=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SSHConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"master pid {self.master_pid}"
        return f"SSHConnection({self.host!r}, {state})"


def _strip_marker(returncode: int, stderr: bytes) -> tuple[int, bytes]:
    """The remote command's return code (``-N`` for signal N) and its stderr without the wrapper's line."""
    markers = list(_MARKER_BYTES_RE.finditer(stderr))
    if not markers or int(markers[-1].group(1)) != returncode:
        return returncode, stderr
    last = markers[-1]
    cleaned = stderr[: last.start()] + stderr[last.end() :]
    if returncode > 128 and returncode - 128 <= _MAX_SIGNAL:
        return -(returncode - 128), cleaned
    return returncode, cleaned


def _socket_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a side of ``ssh -L``'s spec: absolute, without ':', and short enough to bind."""
    text = os.fspath(path)
    if ":" in text or not os.path.isabs(text):
        raise ConfigError(f"a forwarded socket needs an absolute path without ':', not {text!r}")
    if len(os.fsencode(text)) > SUN_PATH_MAX:
        raise ConfigError(f"socket path {text} is longer than {SUN_PATH_MAX} bytes")
    return text
