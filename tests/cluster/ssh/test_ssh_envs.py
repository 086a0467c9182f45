"""Envs that bring their code to SSH hosts: a git repository's checkout and requirements, a working_dir."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs.fakeconda import CONDA_YML, fake_conda_tool, recorded
from envs.gitrepos import JOKES_FILES, make_repo
from sshd_hosts import SshHosts

import runmap as rm
from runmap.cluster.ssh import SSHCluster
from runmap.envs import git as rm_git
from runmap.envs.conda import create_command

HOSTS = ["host-a", "host-b"]


@pytest.fixture
def hosts(ssh_hosts: SshHosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SSHCluster]:
    monkeypatch.setenv("RUNMAP_CACHE", str(tmp_path / "cache"))  # the client's git cache
    with rm.cluster("ssh", hosts=HOSTS, name="envs", config_file=ssh_hosts.config) as cluster:
        yield cluster  # type: ignore[misc]
    ssh_hosts.assert_clean(within=15)  # a loaded machine takes a moment to end sshd's per-connection processes


def listing(_: object = None) -> tuple[list[str], str, str]:
    import shipped_mod  # type: ignore[import-not-found]

    files = sorted(
        os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk(".") for f in fs if "__pycache__" not in d
    )
    return files, shipped_mod.WHO, os.getcwd()


def test_a_git_env_maps_on_ssh_hosts_with_its_requirements(
    ssh_hosts: SshHosts, hosts: SSHCluster, tmp_path: Path
) -> None:
    url, sha = make_repo(tmp_path / "repo", JOKES_FILES)
    assert importlib.util.find_spec("pyjokes") is None and importlib.util.find_spec("gitonly_jokes") is None
    env = rm.env(name="jokes", compute={"CPU": 1},
                 git=rm.GitRepo(url, path="src", reqs_file="requirements.txt"))
    fetches = rm_git.fetch_count
    remote = rm.function("gitonly_jokes:joke_length").to(hosts, env=env)
    with rm.mapper(remote, num_replicas=2) as m:
        assert len(m.replicas) == 2
        used = {r.servlet.host for r in m.replicas}
        results = m.map(range(100), progress=False)
    assert [r[0] for r in results] == list(range(100))
    assert all(ok and version == "0.8.3" for _, ok, version, _ in results)
    assert rm_git.fetch_count == fetches + 1
    assert {h for h, *_ in hosts.shipments} == used  # the checkout went to the hosts that run replicas
    # A second map at the same commit: nothing fetched, nothing built, nothing shipped.
    again = rm.env(name="jokes-2", compute={"CPU": 1}, git=rm.GitRepo(url, path="src", reqs_file="requirements.txt"))
    with rm.mapper(rm.function("gitonly_jokes:joke_length").to(hosts, env=again), num_replicas=2) as m:
        assert len(m.map(range(10), progress=False)) == 10
    assert rm_git.fetch_count == fetches + 1
    assert again.content_hash == env.content_hash
    assert all(hosts.host_info(h, again) is hosts.host_info(h, env) for h in used)  # no second bootstrap
    sent = [h for h, _, _, was_sent in hosts.shipments if was_sent]
    assert sorted(sent) == sorted(set(sent))  # each host got the checkout once at most
    assert any(not was_sent for *_, was_sent in hosts.shipments)


def test_a_working_dir_is_shipped_once_without_git_and_ignored_paths(
    ssh_hosts: SshHosts, hosts: SSHCluster, tmp_path: Path
) -> None:
    wd = tmp_path / "wd"
    (wd / ".git").mkdir(parents=True)
    (wd / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (wd / "__pycache__").mkdir()
    (wd / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (wd / "data").mkdir()
    (wd / "data" / "big.bin").write_bytes(b"\0" * 10)
    (wd / "data" / "keep.txt").write_text("keep")
    (wd / "secret.txt").write_text("not shipped")
    (wd / ".runmapignore").write_text("# comment\nsecret.txt\ndata/big.bin\n")
    (wd / "shipped_mod.py").write_text("WHO = 'shipped'\n")
    env = rm.env(name="wd", compute={"CPU": 2}, working_dir=wd)
    files, who, cwd = rm.function(listing).to(hosts, env=env)()
    assert who == "shipped"
    assert files == sorted([".runmapignore", ".runmap-shipped", "data/keep.txt", "shipped_mod.py"])
    assert cwd != str(wd) and "/dirs/" in cwd
    assert [s[3] for s in hosts.shipments] == [True]
    # Unchanged: not sent again, to a second replica on the same host, nor to a second env.
    with rm.mapper(rm.function(listing).to(hosts, env=rm.env(name="wd2", compute={"CPU": 1}, working_dir=wd)),
                   num_replicas=2) as m:
        assert {os.path.basename(r[2]) for r in m.map(range(4), progress=False)} == {os.path.basename(cwd)}
    sent = [h for h, _, _, was_sent in hosts.shipments if was_sent]
    assert sorted(sent) == sorted(set(sent)) and len(hosts.shipments) == 3  # once per host at most
    assert any(not s[3] for s in hosts.shipments)  # a second replica on a host: not sent again
    # Changed: sent anew.
    (wd / "shipped_mod.py").write_text("WHO = 'changed'\n")
    assert rm.function(listing).to(hosts, env=rm.env(name="wd3", working_dir=wd))()[1] == "changed"
    assert hosts.shipments[-1][3] is True


def test_a_host_python_of_another_minor_version_fails_at_start(
    hosts: SSHCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = hosts.host_info

    def other_version(host: str, env: rm.Env):  # type: ignore[no-untyped-def]
        return dataclasses.replace(real(host, env), python_version=(3, sys.version_info[1] + 1, 0))

    monkeypatch.setattr(hosts, "host_info", other_version)
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    with pytest.raises(rm.ClusterError, match=rf"Python 3\.{sys.version_info[1] + 1} .* client runs Python {ours}"):
        rm.function(len).to(hosts, env=rm.env(name="old"))


def test_an_unreachable_repository_and_a_missing_requirement_are_named(hosts: SSHCluster, tmp_path: Path) -> None:
    with pytest.raises(rm.ConfigError, match="nowhere-repo"):
        rm.env(git=rm.GitRepo(f"file://{tmp_path}/nowhere-repo"))
    url, _ = make_repo(tmp_path / "repo", {"requirements.txt": "runmap-no-such-package-xyz==1.0\n"})
    env = rm.env(name="bad", git=rm.GitRepo(url, reqs_file="requirements.txt"))
    with pytest.raises(rm.ClusterError, match="runmap-no-such-package-xyz"):
        rm.function(len).to(hosts, env=env)


@pytest.fixture
def conda_tools(ssh_hosts: SshHosts) -> Iterator[dict[str, Path]]:
    """host-a: a stand-in micromamba in ~/.local/bin; host-b: a stand-in mamba whose env runs Python 3.99;
    host-c: none. See tests/envs/fakeconda.py: only the solve and the download are not real."""
    tools, made = {}, []
    for alias, name, version in [("host-a", "micromamba", None), ("host-b", "mamba", "3.99.0")]:
        home = ssh_hosts.host(alias).home
        made.append(next((d for d in (home / ".local", home / ".local" / "bin") if not d.exists()), None))
        tools[alias] = fake_conda_tool(home / ".local" / "bin", name, version, owner=ssh_hosts.host(alias).user)
    try:
        yield tools
    finally:
        for tool, first_made in zip(tools.values(), made, strict=True):
            if first_made is not None:
                shutil.rmtree(first_made)
            else:
                for path in (tool, tool.parent / "conda-argv.txt", tool.parent / "conda-file.yml"):
                    path.unlink(missing_ok=True)


def test_a_conda_file_is_built_on_the_host_with_the_hosts_conda_tool(
    ssh_hosts: SshHosts, conda_tools: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNMAP_CACHE", str(tmp_path / "cache"))
    url, _ = make_repo(tmp_path / "repo", {**JOKES_FILES, "environment.yml": CONDA_YML})
    env = rm.env(name="conda", git=rm.GitRepo(url, path="src", reqs_file="requirements.txt",
                                              conda_file="environment.yml"))  # fmt: skip
    config = ssh_hosts.config
    with rm.cluster("ssh", hosts=["host-a"], name="conda-a", config_file=config) as cluster:
        with rm.mapper(rm.function("gitonly_jokes:joke_length"), cluster=cluster, env=env, num_replicas=2) as m:
            results = m.map(range(10), progress=False)
        info = cluster.host_info("host-a", env)  # type: ignore[attr-defined]
    assert info.built and info.installer == "micromamba+uv"
    # Both replicas ran in the env the host's tool made, with the reqs_file installed into it after.
    assert {(ok, version, prefix) for _, ok, version, prefix in results} == {(True, "0.8.3", info.env_dir)}
    argv, text = recorded(conda_tools["host-a"])
    assert argv == create_command(str(conda_tools["host-a"]), info.env_dir, f"{info.env_dir}.environment.yml")
    assert text == CONDA_YML
    # Cached on the host: a later cluster builds nothing.
    with rm.cluster("ssh", hosts=["host-a"], name="conda-a2", config_file=config) as cluster:
        assert rm.function("gitonly_jokes:joke_length").to(cluster, env=env)(3)[0] == 3
        assert cluster.host_info("host-a", env).built is False  # type: ignore[attr-defined]

    # A conda file whose env runs another Python than the client's, with mamba's command line.
    with rm.cluster("ssh", hosts=["host-b"], name="conda-b", config_file=config) as cluster:
        ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
        with pytest.raises(rm.ClusterError, match=rf"preparing host-b: env of environment.yml: its conda file gives "
                                                  rf"Python 3\.99\.0, but the client runs Python {ours}; pin python="):
            rm.function(len).to(cluster, env=env)
    argv, _ = recorded(conda_tools["host-b"])
    assert argv[:6] == [str(conda_tools["host-b"]), "env", "create", "--quiet", "--prefix", argv[5]]
    assert ssh_hosts.run("host-b", f"test -e {argv[5]}").returncode == 1  # the failed env is not left behind

    # A host with none of the tools: named, with what to install.
    with rm.cluster("ssh", hosts=["host-c"], name="conda-c", config_file=config) as cluster:
        said = "preparing host-c: building a conda env needs micromamba, mamba or conda, and none is on the PATH"
        with pytest.raises(rm.ClusterError, match=f"{said} nor in ~/.local/bin.*install micromamba"):
            rm.function(len).to(cluster, env=env)
    ssh_hosts.assert_clean(within=15)
