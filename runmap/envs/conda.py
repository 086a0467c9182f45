"""Conda envs from an ``environment.yml``: the tool that builds them and its command line.

On Ray, a git env's ``conda_file`` goes to Ray's own ``runtime_env["conda"]``; on the local cluster
and on SSH hosts the env is built with ``micromamba``, ``mamba`` or ``conda``: the first of them on
the PATH, else in the places their installers put them (a non-interactive SSH session does not read
the ``~/.bashrc`` lines those installers add to the PATH). A machine with none of them says what to
install.

This module runs on SSH hosts too, loaded by file from the runmap source shipped there (the host's
bootstrap script calls :func:`find_tool` and :func:`create_command`), so it imports only the
standard library at module level: the local and the remote build take the same path.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

TOOLS = ("micromamba", "mamba", "conda")
# Where the tools' installers put them, relative to the home directory (after the PATH).
INSTALL_DIRS = (
    ".local/bin",
    "micromamba/bin",
    "miniforge3/bin",
    "mambaforge/bin",
    "miniconda3/bin",
    "anaconda3/bin",
    "/opt/conda/bin",
)
INSTALL_HINT = (
    "install micromamba (https://mamba.readthedocs.io/en/latest/installation/micromamba-installation.html), "
    "mamba or conda, on the PATH or in ~/.local/bin"
)


def search_path(path: str | None = None, home: str | None = None) -> str:
    """The directories searched for a tool: ``path`` (default: the PATH), then :data:`INSTALL_DIRS`."""
    home = home if home is not None else os.path.expanduser("~")
    dirs = (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    dirs += [os.path.join(home, d) for d in INSTALL_DIRS]
    return os.pathsep.join(d for d in dirs if d)


def find_tool(path: str | None = None, home: str | None = None) -> str | None:
    """The first of micromamba, mamba and conda in :func:`search_path`, or None."""
    where = search_path(path, home)
    for tool in TOOLS:
        found = shutil.which(tool, path=where)
        if found:
            return found
    return None


def missing_message() -> str:
    """What a machine without a conda tool is told: where it was looked for, what to install."""
    searched = ", ".join(d if os.path.isabs(d) else f"~/{d}" for d in INSTALL_DIRS)
    return (
        f"building a conda env needs micromamba, mamba or conda, and none is on the PATH nor in {searched}: "
        f"{INSTALL_HINT}"
    )


def conda_tool(path: str | None = None, home: str | None = None) -> str:
    """The first of micromamba, mamba and conda (see :func:`find_tool`).

    Raises:
        ClusterError: none of them is there; the message says what to install.
    """
    found = find_tool(path, home)
    if found is None:
        from runmap.exceptions import ClusterError

        raise ClusterError(missing_message())
    return found


def python_mismatch(theirs: str, ours: str) -> str | None:
    """Why an env whose Python is ``theirs`` (``"3.12.1"``) cannot serve a client on ``ours`` (``"3.11"``), or None."""
    if ".".join(theirs.split(".")[:2]) == ours:
        return None
    return (
        f"its conda file gives Python {theirs or '(none)'}, but the client runs Python {ours}; pin python={ours} in "
        "it (functions travel pickled by value, which breaks across minor versions)"
    )


def create_command(tool: str, prefix: str, file: str) -> list[str]:
    """The argv that builds the env of ``file`` (an ``environment.yml``) at ``prefix`` with ``tool``."""
    if os.path.basename(tool).startswith("micromamba"):
        return [tool, "create", "--yes", "--prefix", prefix, "--file", file]
    return [tool, "env", "create", "--quiet", "--prefix", prefix, "--file", file]


def with_pip(text: str, pip: list[str]) -> dict[str, Any]:
    """The environment file ``text`` as a dict, with ``pip`` requirements added to its own ``pip:`` list.

    Ray's ``runtime_env`` takes ``pip`` or ``conda``, never both: an env with both hands Ray this.
    Needs PyYAML, which Ray depends on.
    """
    import yaml  # type: ignore[import-untyped,unused-ignore]

    spec = yaml.safe_load(text) or {}
    deps: list[Any] = list(spec.get("dependencies") or [])
    listed = next((d for d in deps if isinstance(d, dict) and "pip" in d), None)
    if listed is not None:
        listed["pip"] = [*(listed["pip"] or []), *pip]
    else:
        if not any(isinstance(d, str) and d.split("=")[0].split()[0] == "pip" for d in deps):
            deps.append("pip")
        deps.append({"pip": list(pip)})
    return {**spec, "dependencies": deps}
