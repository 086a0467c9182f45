"""What a replica process needs: the :class:`Env` spec."""

from runmap.envs.env import Env, env

__all__ = ["Env", "env"]
