"""Envs with requirements: built into their own venv, once, on the local cluster."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

import runmap as rm


def humanize_version(_: object = None) -> tuple[str, str]:
    import humanize
    import six

    assert six.__version__ == "1.16.0", six.__version__  # the env's pin wins over the client's six
    return humanize.__version__, sys.prefix


def test_reqs_are_installed_in_the_replica_only(cluster: rm.LocalCluster, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RUNMAP_CACHE", str(tmp_path / "cache"))
    assert importlib.util.find_spec("humanize") is None, "the test needs a package the client lacks"
    env = rm.env(name="with-reqs", reqs=["humanize==4.9.0", "six==1.16.0"])
    remote = rm.function(humanize_version).to(cluster, env=env)
    version, prefix = remote()
    assert version == "4.9.0"
    assert prefix.startswith(str(tmp_path / "cache")) and prefix != sys.prefix
    # A replica of the env reuses the build: it starts in seconds, not a pip install.
    with rm.mapper(remote, num_replicas=2) as mapper:
        assert {v for v, _ in mapper.map(range(4), progress=False)} == {"4.9.0"}
    builds = os.listdir(tmp_path / "cache" / "envs")
    assert len([b for b in builds if not b.endswith(".lock")]) == 1


def test_a_requirement_that_cannot_install_is_a_clear_error(cluster: rm.LocalCluster, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RUNMAP_CACHE", str(tmp_path / "cache"))
    env = rm.env(name="broken-reqs", reqs=["this-package-does-not-exist-runmap==0.0.1"])
    with pytest.raises(rm.ClusterError, match="broken-reqs"):
        rm.function(len).to(cluster, env=env)
