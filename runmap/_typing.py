"""``TYPE_CHECKING`` without importing :mod:`typing`.

``typing`` costs a process a few milliseconds to import (more under load), and
what ``import runmap`` and ``rm.mapper`` run before the servlets' template starts
(runmap/mapper/__init__.py) needs it for annotations only, which ``from __future__
import annotations`` never evaluates. Such a module imports ``TYPE_CHECKING`` from
here and its annotation-only names under ``if TYPE_CHECKING:``; mypy takes any
name ``TYPE_CHECKING`` as true.
"""

TYPE_CHECKING = False
