"""How the client talks to a servlet: one small interface, several implementations.

:class:`~runmap.transport.base.Channel` is one connection to one servlet; the
HTTP one is what every cluster uses, the in-process one lets the Mapper's
dispatch be tested without processes.
"""

from runmap.transport.base import Channel

__all__ = ["Channel"]
