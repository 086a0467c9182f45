"""Tools the suite checks with that may be missing here: a skip on a laptop, a failure in CI.

A check that passes by skipping proves nothing, so with ``CI=true`` in the
environment (as CI services set it) a missing tool fails the test instead.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def need(module: str) -> ModuleType:
    """``module``, imported; when it cannot be, the test (or test module) is skipped, or fails in CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if in_ci():
            pytest.fail(f"{module} is needed by this test and CI=true, but it cannot be imported: {exc}", pytrace=False)
        pytest.skip(f"{module} is not installed ({exc}); in CI this fails", allow_module_level=True)
