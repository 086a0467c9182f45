"""A git env on a real local Ray: code only the repository has, requirements only Ray installs.

The client fetches the repository (file://) once per commit; Ray uploads the checkout's ``path`` as
the actors' ``working_dir`` and installs its ``reqs_file`` with its own ``pip`` runtime_env. The Ray
started here is small (2 logical CPUs, replicas asking half a CPU each) and shut down at the end.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs.gitrepos import JOKES_FILES, make_repo
from needs import need

import runmap as rm
from runmap.envs import git as rm_git

ray = need("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def local_ray() -> Iterator[rm.Cluster]:
    assert not ray.is_initialized()
    cluster = rm.cluster("ray", num_cpus=2, init_options={"include_dashboard": False})
    try:
        yield cluster
    finally:
        cluster.close()
    assert not ray.is_initialized()


def test_a_function_only_a_git_repo_has_maps_on_ray_with_the_repos_requirements(
    local_ray: rm.Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNMAP_CACHE", str(tmp_path / "cache"))
    url, sha = make_repo(tmp_path / "repo", JOKES_FILES)
    # The client has neither the code nor the package.
    assert importlib.util.find_spec("gitonly_jokes") is None and importlib.util.find_spec("pyjokes") is None
    env = rm.env(name="jokes-on-ray", compute={"CPU": 0.5},
                 git=rm.GitRepo(url, path="src", reqs_file="requirements.txt"))  # fmt: skip
    assert env.git is not None and env.git.commit == sha
    fetches = rm_git.fetch_count
    with rm.mapper(rm.function("gitonly_jokes:joke_length"), cluster=local_ray, env=env, num_replicas=2) as m:
        results = m.map(range(100), progress=False)
        assert len(m.replicas) == 2
        pids = {r.servlet.pid for r in m.replicas}
    assert [r[0] for r in results] == list(range(100))
    assert all(ok and version == "0.8.3" for _, ok, version, _ in results)
    # Ray's own virtualenv for the pip runtime_env, not this interpreter's, not runmap's build cache.
    prefixes = {prefix for *_, prefix in results}
    assert len(prefixes) == 1 and "runtime_resources" in prefixes.pop()
    assert len(pids) == 2
    assert rm_git.fetch_count == fetches + 1
    # A second map at the same commit fetches nothing.
    again = rm.env(name="jokes-on-ray-2", compute={"CPU": 0.5},
                   git=rm.GitRepo(url, path="src", reqs_file="requirements.txt"))  # fmt: skip
    with rm.mapper(rm.function("gitonly_jokes:joke_length"), cluster=local_ray, env=again, num_replicas=1) as m:
        assert len(m.map(range(5), progress=False)) == 5
    assert rm_git.fetch_count == fetches + 1
