"""Local users for tests that play another user of the machine (created when missing; needs root)."""

from __future__ import annotations

import pwd
import subprocess


def ensure_user(name: str) -> pwd.struct_passwd:
    """The local user ``name``, created with a home of its own if it does not exist."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        return pwd.getpwnam(name)


def run_as(user: str, script: str) -> None:
    """Runs a shell ``script`` as ``user``."""
    subprocess.run(["runuser", "-u", user, "--", "sh", "-ec", script], check=True)
