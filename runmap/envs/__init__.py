"""What a replica process needs: the :class:`Env` spec, and :class:`GitRepo` for code from git.

``GitRepo`` is imported when first used: its module (subprocess, shlex, a frozen dataclass)
would add milliseconds to every client's start that never uses git.
"""

from typing import TYPE_CHECKING, Any

from runmap.envs.env import Env, env

if TYPE_CHECKING:
    from runmap.envs.git import GitRepo

__all__ = ["Env", "GitRepo", "env"]


def __getattr__(name: str) -> Any:
    if name == "GitRepo":
        from runmap.envs.git import GitRepo

        return GitRepo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
