"""Envs with requirements: built into their own venv, once, on the local cluster."""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest

import runmap as rm


def humanize_version(_: object = None) -> tuple[str, str]:
    import humanize
    import six

    assert six.__version__ == "1.16.0", six.__version__  # the env's pin wins over the client's six
    return humanize.__version__, sys.prefix


def test_reqs_are_installed_in_the_replica_only(cluster: rm.LocalCluster, tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RUNMAP_CACHE", str(tmp_path / "cache"))
    assert importlib.util.find_spec("humanize") is None, "the test needs a package the client lacks"
    env = rm.env(name="with-reqs", reqs=["humanize==4.9.0", "six==1.16.0"])
    remote = rm.function(humanize_version).to(cluster, env=env)
    # The client is told what is being built, and how long it took.
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("runmap: ")]
    assert said[0] == "runmap: building env 'with-reqs' (humanize==4.9.0, six==1.16.0) into a virtual environment"
    assert re.fullmatch(r"runmap: built env 'with-reqs' in \d+\.\d s", said[1]) and len(said) == 2, said
    version, prefix = remote()
    assert version == "4.9.0"
    assert prefix.startswith(str(tmp_path / "cache")) and prefix != sys.prefix
    # A replica of the env reuses the build: it starts in seconds, not a pip install.
    with rm.mapper(remote, num_replicas=2) as mapper:
        assert {v for v, _ in mapper.map(range(4), progress=False)} == {"4.9.0"}
    builds = os.listdir(tmp_path / "cache" / "envs")
    assert len([b for b in builds if not b.endswith(".lock")]) == 1
    assert "runmap: build" not in capsys.readouterr().out  # nothing built the second time


def test_a_requirement_that_cannot_install_is_a_clear_error(cluster: rm.LocalCluster, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RUNMAP_CACHE", str(tmp_path / "cache"))
    env = rm.env(name="broken-reqs", reqs=["this-package-does-not-exist-runmap==0.0.1"])
    with pytest.raises(rm.ClusterError, match="broken-reqs"):
        rm.function(len).to(cluster, env=env)


def test_requirements_are_checked_when_the_env_is_made(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for bad in ["numpy>>2", "numpy=1.0", "not a requirement", "", "numpy[", "reqs-missing.txt"]:
        with pytest.raises(rm.ConfigError, match="requirement"):
            rm.env(reqs=[bad])
    with pytest.raises(rm.ConfigError, match="requirement"):
        rm.env(reqs="numpy>>2")
    with pytest.raises(rm.ConfigError, match="requirement"):
        rm.env(reqs=[3])  # type: ignore[list-item]
    (tmp_path / "requirements.txt").write_text("humanize==4.9.0\n")
    monkeypatch.chdir(tmp_path)
    good = ["numpy>=2", "requests[socks]==2.31; python_version >= '3.8'", "pkg @ https://example.com/pkg.whl",
            "requirements.txt", str(tmp_path / "requirements.txt")]
    assert rm.env(reqs=good).reqs == tuple(good)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "reqs.txt").write_text("six\n")
    assert rm.env(reqs=["reqs.txt"], working_dir=tmp_path / "sub").reqs == ("reqs.txt",)
