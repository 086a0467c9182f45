"""Code from a git repository: :class:`GitRepo`, resolved to a commit once, fetched once per commit.

    >>> repo = GitRepo("https://github.com/org/repo", ref="main", reqs_file="requirements.txt")  # doctest: +SKIP

``ref`` is resolved with ``git ls-remote`` when the env is made (:meth:`GitRepo.resolved`), so
every replica runs the same commit even if the branch moves meanwhile. :func:`checkout` fetches
that commit into the client's cache (``<cache>/git/<url hash>-<commit>``), once: a second env or
map at the same commit finds the done marker and runs no git command at all. Concurrent checkouts
of one commit wait on a file lock. Every git failure is a :class:`~runmap.exceptions.ConfigError`
(at :func:`env` time) or :class:`~runmap.exceptions.ClusterError` (at first use) quoting git.

git runs on the client only (other hosts get the checkout), with no terminal and no prompt: a
password or passphrase it would ask for is an error, not a hang. Over SSH it uses the user's own
setup (``~/.ssh/config``, the agent, ``core.sshCommand``, ``GIT_SSH_COMMAND``) unless the repository
names its own ``ssh_config``, ``ssh_key`` or ``known_hosts``: then runmap builds ``GIT_SSH_COMMAND``
from those paths (``ssh -o BatchMode=yes -F ... -i ... -o UserKnownHostsFile=...``). Only paths go
on that command line, never a key.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from runmap.exceptions import ClusterError, ConfigError
from runmap.paths import cache_dir, open_private

GIT_TIMEOUT = 600.0
DONE_MARKER = ".runmap-checkout"
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")

# How many times this process fetched a repository (tests assert a second use fetches nothing).
fetch_count = 0
_count_lock = threading.Lock()


@dataclass(frozen=True)
class GitRepo:
    """A git repository as an env's code.

    Attributes:
        url: ``https://...``, ``ssh://...``, ``user@host:path`` (scp-style) or ``file://...``.
        ref: a branch, tag or commit; resolved to ``commit`` when the env is made.
        path: the directory of the repository put on the replicas' import path.
        reqs_file: a requirements file (relative to the repository) installed into the env.
        conda_file: an ``environment.yml`` (relative to the repository) the env is built from.
        commit: the commit ``ref`` resolved to (filled in by :meth:`resolved`).
        ssh_key: a private key file git's ssh logs in with (``-i``, and no other key).
        ssh_config: an OpenSSH client config file git's ssh reads instead of ``~/.ssh/config`` (``-F``).
        known_hosts: the known_hosts file the server's host key is checked against (strictly).

    The last three are paths on the client, not part of what the env is: they are left out of
    its content hash, so the same repository fetched with another key is the same env.

    Example:
        >>> repo = GitRepo("git@github.com:org/repo.git", ssh_key="~/.ssh/deploy_key")  # doctest: +SKIP
    """

    url: str
    ref: str = "main"
    path: str = "."
    reqs_file: str | None = None
    conda_file: str | None = None
    commit: str | None = None
    ssh_key: str | None = None
    ssh_config: str | None = None
    known_hosts: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise ConfigError(f"GitRepo needs a repository URL, not {self.url!r}")
        if not self.ref:
            raise ConfigError("GitRepo's ref must be a branch, tag or commit, not empty")
        for what in ("path", "reqs_file", "conda_file"):
            value = getattr(self, what)
            if value is not None and (os.path.isabs(value) or ".." in Path(value).parts):
                raise ConfigError(f"GitRepo's {what} must be relative to the repository, inside it: {value!r}")
        for what in ("ssh_key", "ssh_config", "known_hosts"):
            value = getattr(self, what)
            if value is None:
                continue
            path = os.path.abspath(os.path.expanduser(os.fspath(value)))
            if not os.path.isfile(path):
                raise ConfigError(f"GitRepo's {what} {value!r} is not a file")
            if '"' in path:
                raise ConfigError(f"GitRepo's {what} {value!r}: ssh cannot take a path with a double quote")
            object.__setattr__(self, what, path)  # git runs in another directory

    def ssh_command(self) -> str | None:
        """``GIT_SSH_COMMAND`` for this repository's own ssh files, or None to leave the user's setup alone."""
        if not (self.ssh_key or self.ssh_config or self.known_hosts):
            return None
        argv = ["ssh", "-o", "BatchMode=yes"]
        if self.ssh_config:
            argv += ["-F", self.ssh_config]
        if self.ssh_key:
            argv += ["-i", self.ssh_key, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:  # quoted for ssh too: a value with spaces would be several files
            argv += ["-o", f'UserKnownHostsFile="{self.known_hosts}"', "-o", "StrictHostKeyChecking=yes"]
        return shlex.join(argv)  # git runs it through the shell

    def resolved(self) -> GitRepo:
        """This repository with ``commit`` set to what ``ref`` names now (``git ls-remote``).

        Raises:
            ConfigError: the repository is unreachable or has no such ref (quoting git).
        """
        if self.commit is not None:
            return self
        if _SHA_RE.match(self.ref):
            return replace(self, commit=self.ref)
        what = f"resolving {self.ref!r} of {self.url}"
        out = _git(["ls-remote", "--", self.url, self.ref], error=ConfigError, what=what, ssh=self.ssh_command())
        refs: dict[str, str] = {}
        for line in out.splitlines():
            sha, _, name = line.partition("\t")
            refs[name.strip()] = sha.strip()
        for name in (self.ref, f"refs/heads/{self.ref}", f"refs/tags/{self.ref}^{{}}", f"refs/tags/{self.ref}"):
            if name in refs:
                return replace(self, commit=refs[name])
        if refs:  # a short name ls-remote matched by its tail
            return replace(self, commit=next(iter(refs.values())))
        raise ConfigError(f"git repository {self.url} has no branch or tag {self.ref!r} (git ls-remote found none)")

    @property
    def key(self) -> str:
        """The checkout's directory name in the cache: the URL's hash and the commit."""
        if self.commit is None:
            raise ConfigError(f"GitRepo {self.url} is not resolved to a commit yet")
        return f"{hashlib.sha256(self.url.encode()).hexdigest()[:12]}-{self.commit}"


def _git(
    args: list[str], *, error: type[Exception], what: str, cwd: Path | None = None, ssh: str | None = None
) -> str:
    environ = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"}
    environ.setdefault("SSH_ASKPASS_REQUIRE", "never")
    if ssh is not None:
        environ["GIT_SSH_COMMAND"] = ssh
    try:
        # A session of its own: no controlling terminal, so neither git nor ssh can prompt on it.
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=GIT_TIMEOUT, env=environ, cwd=cwd,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    except FileNotFoundError:
        raise error(f"{what}: git is not installed (no `git` on the PATH)") from None
    except subprocess.TimeoutExpired:
        raise error(f"{what}: git {args[0]} took over {GIT_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-2000:]
        raise error(f"{what}: git {args[0]} failed (exit {done.returncode}):\n{said}")
    return done.stdout


_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


def checkout(repo: GitRepo) -> Path:
    """The root of ``repo``'s checkout at its commit in the client's cache, fetched if need be.

    Raises:
        ClusterError: the fetch failed (quoting git), or a file the repo names is not in it.
    """
    repo = repo.resolved()
    root = cache_dir("git") / repo.key
    if not (root / DONE_MARKER).exists():
        with _locks_lock:
            gate = _locks.setdefault(repo.key, threading.Lock())
        with gate, os.fdopen(open_private(root.parent / f"{repo.key}.lock", os.O_WRONLY | os.O_CREAT), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / DONE_MARKER).exists():
                _fetch(repo, root)
    _check_files(repo, root)
    return root


def code_dir(repo: GitRepo) -> Path:
    """The directory of the checkout that goes on the import path (``repo.path``)."""
    return (checkout(repo) / repo.path).resolve()


def _fetch(repo: GitRepo, root: Path) -> None:
    global fetch_count
    assert repo.commit is not None
    if root.exists():
        shutil.rmtree(root)  # an interrupted fetch
    what = f"fetching {repo.url} at {repo.commit[:12]} ({repo.ref})"
    ssh = repo.ssh_command()
    try:
        root.mkdir(parents=True)
        _git(["init", "--quiet", str(root)], error=ClusterError, what=what)
        with _count_lock:
            fetch_count += 1
        try:
            _git(["fetch", "--quiet", "--depth", "1", "--", repo.url, repo.commit], error=ClusterError, what=what,
                 cwd=root, ssh=ssh)
        except ClusterError:
            # A server that refuses a commit by id: fetch the ref, and check the commit is in it.
            _git(["fetch", "--quiet", "--", repo.url, repo.ref], error=ClusterError, what=what, cwd=root, ssh=ssh)
        _git(["-c", "advice.detachedHead=false", "checkout", "--quiet", repo.commit], error=ClusterError,
             what=what, cwd=root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    (root / DONE_MARKER).touch()


def _check_files(repo: GitRepo, root: Path) -> None:
    if not (root / repo.path).is_dir():
        raise ClusterError(f"{repo.url} at {repo.commit}: path {repo.path!r} is not a directory of the repository")
    for what in ("reqs_file", "conda_file"):
        name = getattr(repo, what)
        if name is not None and not (root / name).is_file():
            raise ClusterError(f"{repo.url} at {repo.commit}: {what} {name!r} is not a file of the repository")


def requirement_lines(path: Path) -> list[str]:
    """The arguments a requirements file gives pip, one per requirement (comments left out)."""
    args: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            args += line.split(None, 1)
        else:
            args.append(line)
    return args
