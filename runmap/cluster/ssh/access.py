"""What a servlet on one SSH host needs to reach the cluster's other hosts: a Mapper placed there.

The client reaches each host with its own ssh configuration. A Mapper placed on an SSH
cluster (:meth:`runmap.Mapper.to`) runs on one of the hosts and starts replicas on all of
them, so it needs the same reach from there, as Ray's cluster launcher gives its head node:

- the effective settings of each host, read with ``ssh -G`` on the client (address, port,
  user), so that aliases and ``~/.ssh/config`` resolve as they do here;
- the key that logs in (the cluster's ``key=``, or the first of the host's ``IdentityFile``
  that exists), copied to a private file on the Mapper's host and removed when it ends;
- the host keys the client verified (its ``known_hosts`` lines for those hosts, found with
  ``ssh-keygen -F``): host keys stay verified from the Mapper's host too.

They travel inside the call that starts the Mapper, over the authenticated connection
to its servlet; nothing is put on a command line. Use a key dedicated to the cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runmap.exceptions import ClusterError, ConfigError
from runmap.paths import open_private, runtime_subdir


@dataclass(frozen=True)
class HostAccess:
    """How to log in to one host, in a form that can travel to another host."""

    alias: str
    hostname: str
    port: int
    user: str
    key: bytes
    known_hosts: str

    def config_block(self, key_file: Path, known_hosts: Path) -> str:
        return (
            f"Host {self.alias}\n"
            f"    HostName {self.hostname}\n"
            f"    Port {self.port}\n"
            f"    User {self.user}\n"
            f"    IdentityFile {key_file}\n"
            "    IdentitiesOnly yes\n"
            "    IdentityAgent none\n"
            f"    UserKnownHostsFile {known_hosts}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    UpdateHostKeys no\n"
        )


def gather(hosts: Sequence[str], config_file: str | None, key: str | None) -> list[HostAccess]:
    """Each host's access as this client has it; a host it cannot describe is a ConfigError."""
    return [_one(host, i, config_file, key) for i, host in enumerate(hosts)]


def _one(host: str, i: int, config_file: str | None, key: str | None) -> HostAccess:
    ssh = shutil.which("ssh")
    if ssh is None:
        raise ClusterError("OpenSSH's ssh client is not installed (apt-get install openssh-client)")
    from runmap.cluster.ssh.connection import destination

    argv = [ssh, *(["-F", config_file] if config_file else []), "-G", destination(host)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise ConfigError(f"could not read the ssh settings of {host}: {done.stderr.strip()}")
    settings: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        name, _, value = line.partition(" ")
        settings.setdefault(name, []).append(value)
    if settings.get("proxyjump", ["none"])[0] != "none":
        raise ConfigError(f"{host} is reached through a ProxyJump: a Mapper cannot be placed on such a cluster yet")
    home = Path.home()
    keys = [key] if key else [p.replace("~", str(home), 1) for p in settings.get("identityfile", [])]
    key_file = next((k for k in keys if os.path.isfile(k)), None)
    if key_file is None:
        raise ConfigError(
            f"placing a Mapper on this SSH cluster copies the key that logs in to {host} to the Mapper's host, "
            f"but no key file was found (tried {keys}); pass key= to the cluster"
        )
    hostname, port = settings["hostname"][0], int(settings["port"][0])
    known_files = [f for line in settings.get("userknownhostsfile", []) for f in line.split()]
    return HostAccess(
        alias=host if re.fullmatch(r"[A-Za-z0-9_.-]+", host) else f"runmap-host-{i}",  # a name a Host line takes
        hostname=hostname,
        port=port,
        user=settings["user"][0],
        key=Path(key_file).read_bytes(),
        known_hosts=_known_lines(hostname, port, [f.replace("~", str(home), 1) for f in known_files]),
    )


def _known_lines(hostname: str, port: int, files: list[str]) -> str:
    """The lines of ``files`` that name the host (hashed names included, as ``ssh-keygen -F`` finds them)."""
    name = hostname if port == 22 else f"[{hostname}]:{port}"
    keygen = shutil.which("ssh-keygen")
    lines = []
    for path in files:
        if keygen is None or not os.path.isfile(path):
            continue
        found = subprocess.run([keygen, "-F", name, "-f", path], capture_output=True, text=True, timeout=30)
        lines += [line for line in found.stdout.splitlines() if line and not line.startswith("#")]
    if not lines:
        raise ConfigError(
            f"no known host key for {name} on this client: a Mapper placed on the cluster verifies host keys "
            "as the client does, so connect to the host once first"
        )
    return "\n".join(lines) + "\n"


class InsideConfig:
    """The access of every host written out on the Mapper's host: a private ssh config, key and known_hosts."""

    def __init__(self, hosts: Sequence[HostAccess]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="inside-", dir=runtime_subdir("ssh")))  # 0700, the user's
        known = self.dir / "known_hosts"
        self._write(known, "".join(h.known_hosts for h in hosts).encode())
        blocks = []
        for i, host in enumerate(hosts):
            key = self.dir / f"key-{i}"
            self._write(key, host.key)
            blocks.append(host.config_block(key, known))
        self.path = self.dir / "config"
        self._write(self.path, "\n".join(blocks).encode())

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        with os.fdopen(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            f.write(data)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class FromInside:
    """Builds the SSH cluster again on one of its hosts (a picklable factory, see ``Cluster.from_inside``)."""

    hosts: tuple[HostAccess, ...]
    name: str
    options: dict[str, Any]

    def __call__(self) -> Any:
        from runmap.cluster.ssh.cluster import SSHCluster

        config = InsideConfig(self.hosts)
        try:
            cluster = SSHCluster([h.alias for h in self.hosts], self.name, config_file=config.path, **self.options)
        except BaseException:
            config.remove()
            raise
        cluster.on_close(config.remove)
        return cluster
