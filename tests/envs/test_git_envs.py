"""Envs from a git repository on the local cluster: resolved once, fetched once per commit, built once."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from envs.fakeconda import CONDA_YML, fake_conda_tool, recorded
from envs.gitrepos import JOKES_FILES, commit, make_repo
from needs import need

import runmap as rm
from runmap.envs import git as rm_git
from runmap.envs.builder import build_key
from runmap.envs.conda import conda_tool, create_command


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RUNMAP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_function_only_a_git_repo_has_maps_on_two_replicas(
    cluster: rm.LocalCluster, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, sha = make_repo(tmp_path / "repo", JOKES_FILES)
    # The client has neither the code nor the package.
    assert importlib.util.find_spec("gitonly_jokes") is None
    assert importlib.util.find_spec("pyjokes") is None
    with pytest.raises(ImportError):
        __import__("pyjokes")
    repo = rm.GitRepo(url, ref="main", path="src", reqs_file="requirements.txt")
    env = rm.env(name="jokes", git=repo)
    assert env.git is not None and env.git.commit == sha  # resolved when the env is made
    fetches = rm_git.fetch_count
    remote = rm.function("gitonly_jokes:joke_length").to(cluster, env=env)
    assert rm_git.fetch_count == fetches + 1
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("runmap: ")]
    assert said[0].startswith("runmap: building env 'jokes' (requirements.txt of file://"), said
    with rm.mapper(remote, num_replicas=2) as m:
        results = m.map(range(100), progress=False)
        assert len(m.replicas) == 2
    assert [r[0] for r in results] == list(range(100))
    assert all(ok and version == "0.8.3" for _, ok, version, _ in results)
    assert {prefix for *_, prefix in results} == {str(cache / "envs" / build_key(env))}
    # A class by import path, in the same env.
    greeter = rm.module("gitonly_jokes:Greeter").to(cluster, env=env)("hello")
    assert greeter.greet("git") == "hello, git"

    # A second env and map at the same commit: nothing fetched, nothing built.
    checkout_dir = cache / "git" / env.git.key
    mtime = checkout_dir.stat().st_mtime_ns
    again = rm.env(name="jokes-again", git=rm.GitRepo(url, ref="main", path="src", reqs_file="requirements.txt"))
    assert again.content_hash == env.content_hash
    with rm.mapper(rm.function("gitonly_jokes:joke_length").to(cluster, env=again), num_replicas=2) as m:
        assert len(m.map(range(10), progress=False)) == 10
    assert rm_git.fetch_count == fetches + 1
    assert checkout_dir.stat().st_mtime_ns == mtime
    assert "runmap: build" not in capsys.readouterr().out
    assert len([b for b in os.listdir(cache / "envs") if not b.endswith(".lock")]) == 1


def test_the_commit_is_pinned_when_the_env_is_made(cluster: rm.LocalCluster, cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "repo"
    url, first = make_repo(src, {"pinned_mod.py": "VERSION = 1\ndef version(_=None):\n    return VERSION\n"})
    env = rm.env(name="pinned", git=rm.GitRepo(url))
    second = commit(src, {"pinned_mod.py": "VERSION = 2\ndef version(_=None):\n    return VERSION\n"})
    # The branch moved after the env was made: its replicas still run the first commit.
    assert env.git is not None and env.git.commit == first != second
    assert rm.function("pinned_mod:version").to(cluster, env=env)() == 1
    # A lambda that imports the repo's code in its body works too.
    assert rm.function(lambda x: __import__("pinned_mod").VERSION + x).to(cluster, env=env)(10) == 11
    later = rm.env(name="later", git=rm.GitRepo(url))
    assert later.content_hash != env.content_hash  # the commit is part of the hash
    assert rm.function("pinned_mod:version").to(cluster, env=later)() == 2
    assert rm.env(git=rm.GitRepo(url, ref=first)).git.commit == first  # type: ignore[union-attr]


def test_an_unreachable_repository_or_a_missing_ref_quotes_git(tmp_path: Path, cache: Path) -> None:
    missing = f"file://{tmp_path}/no-such-repo"
    with pytest.raises(rm.ConfigError, match="no-such-repo") as info:
        rm.env(git=rm.GitRepo(missing))
    assert "git ls-remote failed" in str(info.value) and "does not appear to be a git repository" in str(info.value)
    url, _ = make_repo(tmp_path / "repo", {"a.py": ""})
    with pytest.raises(rm.ConfigError, match="has no branch or tag 'nope'"):
        rm.env(git=rm.GitRepo(url, ref="nope"))
    with pytest.raises(rm.ConfigError, match="inside it"):
        rm.GitRepo(url, reqs_file="../etc/passwd")


def test_a_missing_reqs_file_is_a_clear_error_at_first_use(
    cluster: rm.LocalCluster, cache: Path, tmp_path: Path
) -> None:
    url, _ = make_repo(tmp_path / "repo", {"a.py": ""})
    env = rm.env(name="no-reqs-file", git=rm.GitRepo(url, reqs_file="requirements.txt"))
    with pytest.raises(rm.ClusterError, match="reqs_file 'requirements.txt' is not a file of the repository"):
        rm.function(len).to(cluster, env=env)


def test_a_requirement_that_does_not_exist_is_named(cluster: rm.LocalCluster, cache: Path, tmp_path: Path) -> None:
    url, _ = make_repo(tmp_path / "repo", {"requirements.txt": "runmap-no-such-package-xyz==1.0\n"})
    env = rm.env(name="bad-req", git=rm.GitRepo(url, reqs_file="requirements.txt"))
    with pytest.raises(rm.ClusterError, match="runmap-no-such-package-xyz") as info:
        rm.function(len).to(cluster, env=env)
    assert "bad-req" in str(info.value)


def test_a_name_the_replica_cannot_import_is_an_error_naming_it(cluster: rm.LocalCluster) -> None:
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        rm.function("no_such_module_xyz:f").to(cluster)
    with pytest.raises(ImportError, match="nothing_here"):
        rm.function("os.path:nothing_here").to(cluster)
    assert rm.function("os.path:basename").to(cluster)("/a/b") == "b"
    for bad in ["os.path", "os path:x", ":x", "os:"]:
        with pytest.raises(rm.ConfigError, match="package.module:name"):
            rm.function(bad)
    with pytest.raises(rm.ConfigError, match="rm.module takes .package.module:name"):
        rm.module("collections")


def test_conda_commands_and_the_missing_tool_error(tmp_path: Path) -> None:
    assert create_command("/x/micromamba", "/p", "/e.yml") == [
        "/x/micromamba", "create", "--yes", "--prefix", "/p", "--file", "/e.yml"]
    for tool in ("/x/mamba", "/x/conda"):
        assert create_command(tool, "/p", "/e.yml") == [tool, "env", "create", "--quiet", "--prefix", "/p",
                                                        "--file", "/e.yml"]
    (tmp_path / "bin").mkdir()
    home = tmp_path / "home"
    with pytest.raises(rm.ClusterError, match="micromamba, mamba or conda.*nor in ~/.local/bin.*install micromamba"):
        conda_tool(path=str(tmp_path / "bin"), home=str(home))
    # Where installers put it, off the PATH (a non-interactive SSH shell never reads ~/.bashrc's PATH).
    installed = fake_conda_tool(home / "micromamba" / "bin", "micromamba")
    assert conda_tool(path=str(tmp_path / "bin"), home=str(home)) == str(installed)
    fake = fake_conda_tool(tmp_path / "bin", "mamba")
    assert conda_tool(path=str(tmp_path / "bin"), home=str(home)) == str(installed)  # micromamba first
    installed.unlink()
    assert conda_tool(path=str(tmp_path / "bin"), home=str(home)) == str(fake)


def test_a_conda_file_without_a_conda_tool_is_a_clear_error(
    cluster: rm.LocalCluster, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = make_repo(tmp_path / "repo", {"environment.yml": CONDA_YML})
    env = rm.env(name="conda-env", git=rm.GitRepo(url, conda_file="environment.yml"))
    rm_git.checkout(env.git)  # type: ignore[arg-type]  # fetched now, while git is on the PATH
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(rm.ClusterError, match="needs micromamba, mamba or conda"):
        rm.function(len).to(cluster, env=env)


def test_a_conda_file_is_built_with_the_conda_tool_then_its_requirements(
    cluster: rm.LocalCluster, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = make_repo(tmp_path / "repo", {**JOKES_FILES, "environment.yml": CONDA_YML})
    env = rm.env(name="conda-local", git=rm.GitRepo(url, path="src", reqs_file="requirements.txt",
                                                    conda_file="environment.yml"))  # fmt: skip
    tool = fake_conda_tool(tmp_path / "bin", "micromamba")  # stands in for the solve: see fakeconda.py
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _, ok, version, prefix = rm.function("gitonly_jokes:joke_length").to(cluster, env=env)(1)
    root = cache / "envs" / build_key(env)
    assert prefix == str(root) and ok and version == "0.8.3"  # the reqs_file went in after, with uv
    argv, text = recorded(tool)
    checkout_dir = cache / "git" / env.git.key  # type: ignore[union-attr]
    assert argv == create_command(str(tool), str(root), str(checkout_dir / "environment.yml"))
    assert text == CONDA_YML


def test_the_client_cannot_import_the_repo_code(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import pyjokes"], capture_output=True, text=True)
    assert out.returncode != 0 and "No module named 'pyjokes'" in out.stderr


def test_ray_gets_the_checkout_reqs_and_conda_file_in_its_runtime_env(cache: Path, tmp_path: Path) -> None:
    need("ray")
    from ray.runtime_env import RuntimeEnv

    from runmap.cluster.ray.cluster import RayCluster

    url, _ = make_repo(tmp_path / "repo", {**JOKES_FILES, "environment.yml": "dependencies:\n  - python=3.11\n"})
    env = rm.env(name="on-ray", reqs=["six"],
                 git=rm.GitRepo(url, path="src", reqs_file="requirements.txt", conda_file="environment.yml"))
    ray = RayCluster.__new__(RayCluster)  # runtime_env_for reads only the cluster's runtime_env: no Ray started
    ray.runtime_env = {}
    runtime_env = ray.runtime_env_for(env)
    root = cache / "git" / env.git.key  # type: ignore[union-attr]
    assert runtime_env["working_dir"] == str(root / "src")
    # Ray takes pip or conda, not both: the requirements go into the conda file's pip list.
    assert "pip" not in runtime_env
    assert runtime_env["conda"] == {"dependencies": ["python=3.11", "pip", {"pip": ["six", "pyjokes==0.8.3"]}]}
    RuntimeEnv(**runtime_env)  # Ray's own checks accept it
    # Without requirements, Ray reads the file itself; reqs alone go to pip.
    bare = rm.env(name="conda-only", git=rm.GitRepo(url, path="src", conda_file="environment.yml"))
    assert ray.runtime_env_for(bare)["conda"] == str(root / "environment.yml")
    assert ray.runtime_env_for(rm.env(name="pip-only", git=rm.GitRepo(url, path="src", reqs_file="requirements.txt"))
                               )["pip"] == ["pyjokes==0.8.3"]  # fmt: skip


MAPPED_MODULE = '''
def double(x):
    return 2 * x


class Ops:
    @staticmethod
    def triple(x):
        return 3 * x


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def scale(self, x):
        return self.factor * x
'''


def test_a_mapper_places_code_named_by_import_path(cluster: rm.LocalCluster, cache: Path, tmp_path: Path) -> None:
    url, _ = make_repo(tmp_path / "repo", {"src/mapped_mod.py": MAPPED_MODULE})
    env = rm.env(name="by-path", git=rm.GitRepo(url, path="src"))
    # A function named by its path, placed by the mapper itself in the mapper's env.
    with rm.mapper(rm.function("mapped_mod:double"), cluster=cluster, env=env, num_replicas=2) as m:
        assert m.map(range(10), progress=False) == [2 * x for x in range(10)]
        assert len(m.replicas) == 2 and {r.servlet.env.origin for r in m.replicas} == {"by-path"}
    # method= names an attribute of what the path names.
    with rm.mapper(rm.function("mapped_mod:Ops"), "triple", cluster=cluster, env=env, num_replicas=1) as m:
        assert m.map([1, 2], progress=False) == [3, 6]
    # A class named by its path: a method of an instance, either spelling; replicas build their own instance.
    scaler = rm.module("mapped_mod:Scaler").to(cluster, env=env)(10)
    with rm.mapper(scaler.scale, num_replicas=2) as m:
        assert m.map(range(4), progress=False) == [0, 10, 20, 30] and len(m.replicas) == 2
    with rm.mapper(scaler, "scale", num_replicas=2) as m:
        assert m.map([5], progress=False) == [50]
    # Without an env that has the code: the replica's ImportError names the module (when the map starts).
    with pytest.raises(ImportError, match="mapped_mod"), rm.mapper(
        rm.function("mapped_mod:double"), cluster=cluster, num_replicas=1
    ) as m:
        m.map([1], progress=False)
    # A class itself is not something to map.
    for cls in (rm.module("mapped_mod:Scaler"), rm.module("mapped_mod:Scaler").to(cluster, env=env)):
        with pytest.raises(rm.ConfigError, match="cannot map over the class mapped_mod:Scaler: map a method of an"):
            with rm.mapper(cls, cluster=cluster) as m:
                m.map([1], progress=False)
