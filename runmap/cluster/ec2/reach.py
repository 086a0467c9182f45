"""How an EC2 instance is reached over SSH: an address, a user, a key, and its host key, known.

A *reach* turns EC2's description of an instance (a ``describe_instances`` record)
into an :class:`SSHHost`. The EC2 cluster writes each host as a block of an OpenSSH
config file of its own and hands the aliases to an SSH cluster, so everything after
this point (bootstrap, placement, logs, host loss) is the SSH cluster's.

The default, :class:`PublicAddress`, reaches an instance at its public DNS name
(else its public address) as the image's user, with runmap's generated key pair.
Its host key is learnt before the first connection, through the AWS API rather than
the network: cloud-init prints the instance's public host keys on its console
between ``-----BEGIN SSH HOST KEY KEYS-----`` and ``-----END SSH HOST KEY KEYS-----``,
and ``GetConsoleOutput`` returns that console to whoever holds the account's
credentials, so a machine in the middle cannot forge it. The keys are recorded in
runmap's own ``known_hosts`` file (``<config>/ec2/known_hosts``) and ssh checks them
strictly. The console can take a minute or two to show them after boot;
``host_keys="accept-new"`` skips the wait and trusts the key the instance presents on
first contact (trust on first use: a machine in the middle of that first connection
would go unnoticed), then holds it to that key.

Tests pass a reach of their own, mapping each moto instance (which runs no sshd) to a
test sshd host.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runmap.exceptions import ClusterError
from runmap.paths import open_private

_KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
_KEYS_END = "-----END SSH HOST KEY KEYS-----"
CONSOLE_POLL = 5.0  # seconds between two reads of an instance's console
BOOT_TIMEOUT = 600.0  # seconds for an instance to show its host keys and admit SSH


@dataclass(frozen=True)
class SSHHost:
    """Where and how to log in to one instance.

    Attributes:
        address: a host name or IP address.
        port: sshd's port.
        user: the user to log in as.
        key: the private key file to log in with.
        known_hosts: a known_hosts file holding the host's key (``None``: ssh's defaults).
    """

    address: str
    port: int = 22
    user: str = "ubuntu"
    key: str | None = None
    known_hosts: str | None = None


Reach = Callable[[Mapping[str, Any]], SSHHost]
"""A function from EC2's description of an instance to the :class:`SSHHost` to log in to."""


def instance_address(instance: Mapping[str, Any]) -> str:
    """The instance's public DNS name, else its public address, else its private address."""
    return str(
        instance.get("PublicDnsName") or instance.get("PublicIpAddress") or instance.get("PrivateIpAddress") or ""
    )


def console_host_keys(output: str) -> list[str]:
    """The public host keys (``"ssh-ed25519 AAAA..."``) cloud-init printed on an instance's console.

    Args:
        output: the console output, as ``GetConsoleOutput`` returns it (base64) or decoded.

    Example:
        >>> console_host_keys("x\\n-----BEGIN SSH HOST KEY KEYS-----\\nssh-ed25519 AAAAC3 root@ip\\n"
        ...                   "-----END SSH HOST KEY KEYS-----\\n")
        ['ssh-ed25519 AAAAC3']
    """
    text = output
    if _KEYS_BEGIN not in text:
        try:
            text = base64.b64decode(output, validate=True).decode(errors="replace")
        except (binascii.Error, ValueError):
            return []
    keys: list[str] = []
    for block in text.split(_KEYS_BEGIN)[1:]:
        body = block.split(_KEYS_END, 1)[0]
        for line in body.splitlines():
            fields = line.split()
            if len(fields) >= 2 and (fields[0].startswith("ssh-") or fields[0].startswith("ecdsa-")):
                keys.append(f"{fields[0]} {fields[1]}")
    return keys


def record_host_keys(known_hosts: Path, names: Iterable[str], keys: Iterable[str], port: int = 22) -> None:
    """Adds ``keys`` under ``names`` to ``known_hosts`` (created mode 0600), replacing lines of those names."""
    wanted = [n if port == 22 else f"[{n}]:{port}" for n in names if n]
    old = known_hosts.read_text().splitlines() if known_hosts.exists() else []
    kept = [line for line in old if not set(line.split(" ", 1)[0].split(",")) & set(wanted)]
    lines = kept + [f"{','.join(wanted)} {key}" for key in keys]
    tmp = known_hosts.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, known_hosts)


def wait_for_port(address: str, port: int, deadline: float) -> None:
    """Returns once ``address:port`` accepts a TCP connection; a ``ClusterError`` past ``deadline``."""
    while True:
        try:
            with socket.create_connection((address, port), timeout=5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ClusterError(f"{address}:{port} admitted no SSH connection before the deadline ({exc})") from None
        time.sleep(1.0)


class PublicAddress:
    """The default reach: public DNS name, the image's user, runmap's key, host keys from the console.

    Args:
        ec2: a boto3 EC2 client (for ``GetConsoleOutput``).
        key: the private key of the instances' key pair.
        known_hosts: runmap's known_hosts file for EC2 instances.
        user: the image's login user (``"ubuntu"``; ``"ec2-user"`` on Amazon Linux).
        host_keys: ``"console"`` (learnt from the console output, the default) or
            ``"accept-new"`` (trusted on first connection).
        boot_timeout: seconds an instance may take to show its keys and admit SSH.
    """

    def __init__(
        self,
        ec2: Any,
        key: Path,
        known_hosts: Path,
        user: str = "ubuntu",
        host_keys: str = "console",
        boot_timeout: float = BOOT_TIMEOUT,
    ) -> None:
        if host_keys not in ("console", "accept-new"):
            raise ValueError(f"host_keys must be 'console' or 'accept-new', not {host_keys!r}")
        self.ec2, self.key, self.known_hosts = ec2, key, known_hosts
        self.user, self.host_keys, self.boot_timeout = user, host_keys, boot_timeout

    def __call__(self, instance: Mapping[str, Any]) -> SSHHost:
        address = instance_address(instance)
        deadline = time.monotonic() + self.boot_timeout
        if self.host_keys == "console":
            keys = self._console_keys(str(instance["InstanceId"]), deadline)
            names = {address, str(instance.get("PublicIpAddress") or "")}
            record_host_keys(self.known_hosts, sorted(names), keys)
        wait_for_port(address, 22, deadline)
        return SSHHost(address, 22, self.user, str(self.key), str(self.known_hosts))

    def _console_keys(self, instance_id: str, deadline: float) -> list[str]:
        while True:
            try:
                output = self.ec2.get_console_output(InstanceId=instance_id, Latest=True).get("Output") or ""
            except Exception:  # Latest=True is refused on older (Xen) instance types: their buffered console
                output = self.ec2.get_console_output(InstanceId=instance_id).get("Output") or ""
            keys = console_host_keys(output)
            if keys:
                return keys
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"instance {instance_id} showed no SSH host keys on its console within "
                    f"{self.boot_timeout:.0f} s; pass host_keys='accept-new' to trust the key it presents "
                    "on first connection instead"
                )
            time.sleep(CONSOLE_POLL)


def ssh_config(hosts: Mapping[str, SSHHost]) -> str:
    """An OpenSSH client config with one ``Host`` block per alias."""
    blocks = []
    for alias, h in hosts.items():
        lines = [f"Host {alias}", f"    HostName {h.address}", f"    Port {h.port}", f"    User {h.user}"]
        if h.key:
            lines += [f"    IdentityFile {h.key}", "    IdentitiesOnly yes", "    IdentityAgent none"]
        if h.known_hosts:
            lines += [f"    UserKnownHostsFile {h.known_hosts}", "    GlobalKnownHostsFile /dev/null"]
        lines += ["    UpdateHostKeys no", "    PasswordAuthentication no", "    KbdInteractiveAuthentication no"]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
