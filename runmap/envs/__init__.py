"""What a replica process needs: the :class:`Env` spec, and :class:`GitRepo` for code from git."""

from runmap.envs.env import Env, env
from runmap.envs.git import GitRepo

__all__ = ["Env", "GitRepo", "env"]
