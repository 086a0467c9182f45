"""Conda envs from an ``environment.yml``: the tool that builds them and its command line.

On Ray, a git env's ``conda_file`` goes to Ray's own ``runtime_env["conda"]``; on other clusters
the env is built with ``micromamba``, ``mamba`` or ``conda``, the first of them on the PATH, and a
cluster without any of them says what to install.
"""

from __future__ import annotations

import os
import shutil

from runmap.exceptions import ClusterError

TOOLS = ("micromamba", "mamba", "conda")
INSTALL_HINT = (
    "install micromamba (https://mamba.readthedocs.io/en/latest/installation/micromamba-installation.html), "
    "mamba or conda and put it on the PATH"
)


def conda_tool(path: str | None = None) -> str:
    """The first of micromamba, mamba and conda on ``path`` (default: the PATH).

    Raises:
        ClusterError: none of them is there; the message says what to install.
    """
    for tool in TOOLS:
        found = shutil.which(tool, path=path)
        if found:
            return found
    raise ClusterError(
        f"building a conda env needs micromamba, mamba or conda, and none is on the PATH: {INSTALL_HINT}"
    )


def conda_create_command(tool: str, prefix: str, file: str) -> list[str]:
    """The argv that builds the env of ``file`` (an ``environment.yml``) at ``prefix`` with ``tool``."""
    if os.path.basename(tool).startswith("micromamba"):
        return [tool, "create", "--yes", "--prefix", prefix, "--file", file]
    return [tool, "env", "create", "--quiet", "--prefix", prefix, "--file", file]
