"""The Env spec: what a replica's process needs to run a module."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from runmap.exceptions import ConfigError

if TYPE_CHECKING:
    from runmap.envs.git import GitRepo  # imported when an env has one (envs/__init__.py says why)

DEFAULT_NAME = "default"


@dataclass(frozen=True)
class Env:
    """A named process environment for replicas.

    Attributes:
        name: the env's name; a servlet on a cluster is found by it.
        reqs: pip requirements (``["numpy>=2"]``), or the path of a requirements file.
        compute: resources each replica asks of its cluster, such as
            ``{"CPU": 0.5, "GPU": 1, "memory": 2**30}``; other keys are custom resources.
        env_vars: environment variables set in the replica's process.
        working_dir: the replica's working directory (and first entry of ``sys.path``).
        origin: the env this one replicates (its own name for an original).
        git: a repository whose code (at one commit) and requirements the replicas get.

    Example:
        >>> e = Env(name="model", compute={"CPU": 0.5})
        >>> e.replicate(1).name
        'model_replica_1'
    """

    name: str = DEFAULT_NAME
    reqs: tuple[str, ...] = ()
    compute: Mapping[str, float] = field(default_factory=dict)
    env_vars: Mapping[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    origin: str = ""
    git: GitRepo | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"an env name must be non-empty and contain no '/': {self.name!r}")
        for key, amount in self.compute.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
                raise ConfigError(f"compute[{key!r}] must be a number >= 0, not {amount!r}")
        for key, value in self.env_vars.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigError(f"env_vars must map str to str, not {key!r}: {value!r}")
        check_requirements(self.reqs, self.working_dir)
        if self.git is not None:
            from runmap.envs.git import GitRepo

            if not isinstance(self.git, GitRepo):
                raise ConfigError(f"git must be an rm.GitRepo, not {type(self.git).__name__}")
            object.__setattr__(self, "git", self.git.resolved())  # the commit, now: every replica runs it
        if not self.origin:
            object.__setattr__(self, "origin", self.name)

    def replicate(self, i: int) -> Env:
        """The env of replica ``i``: the same spec, named ``<origin>_replica_<i>``."""
        return replace(self, name=f"{self.origin}_replica_{i}")

    def renamed(self, name: str) -> Env:
        """The same spec under another name, as an original of its own."""
        return replace(self, name=name, origin=name)

    def checked_working_dir(self) -> str | None:
        """``working_dir`` as an absolute path, after checking that it is a directory here."""
        if self.working_dir is None:
            return None
        if not os.path.isdir(self.working_dir):
            raise ConfigError(f"working_dir {self.working_dir!r} of env {self.name!r} is not a directory")
        return os.path.abspath(self.working_dir)

    @property
    def needs_build(self) -> bool:
        """Whether the env installs anything: ``reqs``, or a git repository's requirements or conda file."""
        return bool(self.reqs) or (self.git is not None and bool(self.git.reqs_file or self.git.conda_file))

    @property
    def content_hash(self) -> str:
        """A hash of what the env installs and sets (the git commit among it), not of its name."""
        parts: list[object] = [list(self.reqs), dict(self.env_vars), self.working_dir]
        if self.git is not None:
            g = self.git
            parts.append([g.url, g.commit, g.path, g.reqs_file, g.conda_file])
        body = json.dumps(parts, sort_keys=True)
        import hashlib  # here: a plain map never hashes an env, and hashlib costs a short script ~5 ms

        return hashlib.sha256(body.encode()).hexdigest()[:16]


def check_requirements(reqs: Sequence[str], working_dir: str | None = None) -> None:
    """Checks each of ``reqs`` now, not when a replica's build fails seconds later.

    A requirement is a PEP 508 string (``"numpy>=2"``, ``"pkg @ https://..."``),
    or the path of a requirements file ending in ``.txt`` that exists (relative
    to ``working_dir``, else to the working directory). What pip takes besides
    (a URL, the path of an existing wheel or project, an option such as
    ``--extra-index-url=...``) passes unchecked.

    Raises:
        ConfigError: naming the requirement and what is wrong with it.
    """
    if not reqs:
        return  # no import of packaging (tens of ms) for the common env without requirements
    from packaging.requirements import InvalidRequirement, Requirement

    base = working_dir or os.getcwd()
    for req in reqs:
        if not isinstance(req, str):
            raise ConfigError(f"a requirement must be a string, not {req!r}")
        if req.endswith(".txt"):
            if not os.path.isfile(os.path.join(base, req)):
                raise ConfigError(f"requirements file {req!r} not found (looked in {base})")
            continue
        if req.startswith("-") or "://" in req or (req and os.path.exists(os.path.join(base, req))):
            continue
        try:
            Requirement(req)
        except InvalidRequirement as exc:
            raise ConfigError(f"{req!r} is not a valid requirement: {exc}") from None


def env(
    name: str | None = None,
    reqs: Sequence[str] | str | None = None,
    compute: Mapping[str, float] | None = None,
    env_vars: Mapping[str, str] | None = None,
    working_dir: str | os.PathLike[str] | None = None,
    git: GitRepo | None = None,
) -> Env:
    """Describes an env.

    Args:
        name: the env's name; defaults to ``"default"``.
        reqs: pip requirement strings, or the path of a requirements file.
        compute: resources each replica asks for (``{"CPU": 0.5, "GPU": 1}``).
        env_vars: environment variables for the replica's process.
        working_dir: the replica's working directory.
        git: an :class:`~runmap.envs.git.GitRepo`: its ``ref`` is resolved to a commit now
            (a :class:`ConfigError` quoting git if the repository or the ref is not there).

    Example:
        >>> import runmap as rm
        >>> rm.env(name="model", compute={"CPU": 0.5}).name
        'model'
    """
    if isinstance(reqs, str):
        reqs_t: tuple[str, ...] = (reqs,)
    else:
        reqs_t = tuple(reqs or ())
    return Env(
        name=name or DEFAULT_NAME,
        reqs=reqs_t,
        compute=dict(compute or {}),
        env_vars=dict(env_vars or {}),
        working_dir=os.fspath(working_dir) if working_dir is not None else None,
        git=git,
    )
