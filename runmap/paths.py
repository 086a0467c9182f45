"""Where runmap keeps files of its own: servlet logs, the cluster registry, env caches.

Every directory runmap keeps files in must be the user's own, as OpenSSH and
tmux demand of theirs: another user of the machine who could create or write
it could plant a symlink that runmap then writes through, or read what the
replicas print. So a directory runmap uses is created mode 0700, and one that
already exists is refused unless it is a real directory (not a symlink) owned
by this user and writable by nobody else (:func:`private_dir`). Files in them
are opened without following symlinks (:func:`open_private`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from runmap.exceptions import ConfigError

SUN_PATH_MAX = 107  # a Unix socket's path, NUL excluded, must fit in sockaddr_un (108 bytes on Linux)


class UnsafePathError(ConfigError):
    """A directory or file runmap would trust belongs to someone else or is open to others."""


def private_dir(path: Path, *, what: str = "runmap's directory", hint: str = "") -> Path:
    """``path``, created mode 0700 (with missing parents) if absent, checked if present.

    Raises:
        UnsafePathError: ``path`` is a symlink, not a directory, owned by another
            user, or writable by group or others.
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafePathError(f"{what} {path} cannot be used: {exc}") from None
    problem = unsafe(st, directory=True)
    if problem:
        raise UnsafePathError(
            f"refusing {what} {path}: it {problem}, so another user could plant files in it. "
            + (hint or f"Remove it, or point runmap elsewhere with RUNMAP_HOME={path.parent}/<a directory of yours>.")
        )
    return path


def unsafe(st: os.stat_result, directory: bool = False) -> str:
    """What makes a path with this ``lstat`` unsafe to trust (``"is a symlink"``, ...), or ``""``."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if directory and not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid} ({user_name(st.st_uid)}), not by you (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_APPEND | os.O_CREAT) -> int:
    """A file descriptor for ``path``, never through a symlink; a file it creates is mode 0600."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePathError(f"refusing to open {path}: it is a symlink") from None
        raise exc


def runtime_dir() -> Path:
    """``$RUNMAP_HOME``, else ``$XDG_RUNTIME_DIR/runmap``, else ``<tmp>/runmap-<uid>``; private to the user."""
    if os.environ.get("RUNMAP_HOME"):
        base = Path(os.environ["RUNMAP_HOME"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "runmap"
    else:
        import tempfile  # only here (with shutil, ~4 ms of import): not needed under RUNMAP_HOME or XDG_RUNTIME_DIR

        base = Path(tempfile.gettempdir()) / f"runmap-{os.getuid()}"
    return private_dir(base, what="runmap's runtime directory")


def runtime_subdir(*parts: str) -> Path:
    """A private directory under :func:`runtime_dir`."""
    path = runtime_dir()
    for part in parts:
        path = private_dir(path / part, what="runmap's runtime directory")
    return path


def log_dir(cluster: str) -> Path:
    return runtime_subdir("logs", cluster)


def cache_dir(*parts: str) -> Path:
    """``$RUNMAP_CACHE``, else ``$XDG_CACHE_HOME/runmap``, else ``~/.cache/runmap``: kept across runs."""
    if os.environ.get("RUNMAP_CACHE"):
        path = Path(os.environ["RUNMAP_CACHE"])
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "runmap"
    hint = "Remove it, or point runmap elsewhere with RUNMAP_CACHE=<a directory of yours>."
    path = private_dir(path, what="runmap's cache directory", hint=hint)
    for part in parts:
        path = private_dir(path / part, what="runmap's cache directory", hint=hint)
    return path


def user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return "no such user"
