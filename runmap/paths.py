"""Where runmap keeps files of its own: servlet logs, the cluster registry, env caches."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def runtime_dir() -> Path:
    """``$RUNMAP_HOME``, else ``$XDG_RUNTIME_DIR/runmap``, else ``<tmp>/runmap-<uid>``."""
    if os.environ.get("RUNMAP_HOME"):
        base = Path(os.environ["RUNMAP_HOME"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "runmap"
    else:
        base = Path(tempfile.gettempdir()) / f"runmap-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


def log_dir(cluster: str) -> Path:
    path = runtime_dir() / "logs" / cluster
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """``$RUNMAP_CACHE``, else ``$XDG_CACHE_HOME/runmap``, else ``~/.cache/runmap``: kept across runs."""
    if os.environ.get("RUNMAP_CACHE"):
        base = Path(os.environ["RUNMAP_CACHE"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "runmap"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base
