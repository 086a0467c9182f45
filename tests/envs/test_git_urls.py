"""Git envs fetched over ssh:// and scp-style URLs from a real sshd host, and over https:// from a real server.

The SSH server is one of the test hosts (tests/sshd_hosts.py): a bare repository in its user's home,
fetched by the client's git through the host's sshd, its host key checked against a known_hosts
file. The HTTPS server is ``git http-backend`` behind a TLS server on loopback (tests/envs/githttp.py).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from envs.githttp import serve_https
from envs.gitrepos import URL_MODULE, bare_copy, make_repo
from sshd_hosts import SshHosts

import runmap as rm
from runmap.envs import git as rm_git

FILES = {"src/urlmod.py": URL_MODULE}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RUNMAP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def on_host_a(ssh_hosts: SshHosts, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A bare repository in host-a's user's home (its path there) and its commit."""
    _, sha = make_repo(tmp_path / "work", FILES)
    host = ssh_hosts.host("host-a")
    bare = bare_copy(tmp_path / "work", host.home / "urls.git", owner=host.user)
    try:
        yield bare, sha
    finally:
        shutil.rmtree(bare)
        ssh_hosts.assert_clean("host-a", within=15)  # git's ssh sessions ended


def _maps_from_the_checkout(env: rm.Env, cache: Path, cluster: rm.LocalCluster) -> None:
    """The repo's function maps on two replicas, placed by the mapper (no .to()), from the client's cache."""
    assert importlib.util.find_spec("urlmod") is None
    with rm.mapper(rm.function("urlmod:double"), cluster=cluster, env=env, num_replicas=2) as m:
        assert m.map(range(20), progress=False) == [2 * x for x in range(20)]
        assert len(m.replicas) == 2
    assert env.git is not None
    assert rm.function("urlmod:where").to(cluster, env=env)() == str(cache / "git" / env.git.key / "src")


def test_an_ssh_url_is_fetched_with_the_repos_key_and_known_hosts(
    ssh_hosts: SshHosts, on_host_a: tuple[Path, str], cache: Path, cluster: rm.LocalCluster, tmp_path: Path
) -> None:
    bare, sha = on_host_a
    host = ssh_hosts.host("host-a")
    url = f"ssh://{host.user}@{host.address}:{host.port}{bare}"
    repo = rm.GitRepo(url, path="src", ssh_key=str(ssh_hosts.client_key), known_hosts=str(ssh_hosts.known_hosts))
    # runmap's GIT_SSH_COMMAND names the files; the key's content is on no command line.
    command = repo.ssh_command()
    assert command is not None and str(ssh_hosts.client_key) in command and "StrictHostKeyChecking=yes" in command
    assert ssh_hosts.client_key.read_text().splitlines()[1] not in command
    fetches = rm_git.fetch_count
    env = rm.env(name="over-ssh", git=repo)
    assert env.git is not None and env.git.commit == sha
    _maps_from_the_checkout(env, cache, cluster)
    assert rm_git.fetch_count == fetches + 1
    # The same repository through another key file is the same env: nothing fetched again.
    other_key = tmp_path / "copy_of_key"
    shutil.copy(ssh_hosts.client_key, other_key)
    again = rm.env(name="over-ssh-2", git=rm.GitRepo(url, path="src", ssh_key=str(other_key),
                                                     known_hosts=str(ssh_hosts.known_hosts)))  # fmt: skip
    assert again.content_hash == env.content_hash
    assert rm.function("urlmod:double").to(cluster, env=again)(4) == 8
    assert rm_git.fetch_count == fetches + 1


def test_an_scp_style_url_goes_through_the_repos_ssh_config(
    ssh_hosts: SshHosts, on_host_a: tuple[Path, str], cache: Path, cluster: rm.LocalCluster
) -> None:
    bare, sha = on_host_a
    # host-a is an alias of that config (address, port, user, key, known_hosts); the path is the home's.
    env = rm.env(name="scp", git=rm.GitRepo(f"host-a:{bare.name}", path="src", ssh_config=str(ssh_hosts.config)))
    assert env.git is not None and env.git.commit == sha
    _maps_from_the_checkout(env, cache, cluster)


def test_the_users_own_git_ssh_command_is_used_when_the_repo_names_no_ssh_files(
    ssh_hosts: SshHosts, on_host_a: tuple[Path, str], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare, sha = on_host_a
    url = f"host-a:{bare.name}"
    with pytest.raises(rm.ConfigError, match="host-a"):  # ~/.ssh/config has no host-a
        rm.env(git=rm.GitRepo(url))
    monkeypatch.setenv("GIT_SSH_COMMAND", f"ssh -F {ssh_hosts.config}")
    assert rm.env(git=rm.GitRepo(url)).git.commit == sha  # type: ignore[union-attr]


def test_a_host_key_that_does_not_match_is_refused(
    ssh_hosts: SshHosts, on_host_a: tuple[Path, str], cache: Path, tmp_path: Path
) -> None:
    bare, _ = on_host_a
    host_a, host_b = ssh_hosts.host("host-a"), ssh_hosts.host("host-b")
    url = f"ssh://{host_a.user}@{host_a.address}:{host_a.port}{bare}"
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[{host_a.address}]:{host_a.port} {host_b.host_key}\n")  # host-b's key under host-a's name
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    for known_hosts, said in [(wrong, "REMOTE HOST IDENTIFICATION HAS CHANGED"), (empty, "No .* host key is known")]:
        with pytest.raises(rm.ConfigError) as info:
            rm.env(git=rm.GitRepo(url, ssh_key=str(ssh_hosts.client_key), known_hosts=str(known_hosts)))
        message = str(info.value)
        assert url in message and "git ls-remote failed" in message and "Host key verification failed" in message
        assert re.search(said, message), message
    with pytest.raises(rm.ConfigError, match="ssh_key '/no/such/key' is not a file"):
        rm.GitRepo(url, ssh_key="/no/such/key")


def test_an_https_url_is_fetched_from_a_git_server(cache: Path, tmp_path: Path, cluster: rm.LocalCluster,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    _, sha = make_repo(tmp_path / "work", FILES)
    bare_copy(tmp_path / "work", tmp_path / "served" / "urls.git")
    with serve_https(tmp_path / "served", tmp_path / "tls") as server:
        url = f"{server.url}/urls.git"
        # A certificate nobody said to trust: git's own words (gnutls or OpenSSL builds of git).
        with pytest.raises(rm.ConfigError, match="certificate verification failed|SSL certificate problem") as info:
            rm.env(git=rm.GitRepo(url))
        assert url in str(info.value)
        monkeypatch.setenv("GIT_SSL_CAINFO", str(server.ca_file))
        with pytest.raises(rm.ConfigError, match="no-such.git"):
            rm.env(git=rm.GitRepo(f"{server.url}/no-such.git"))
        env = rm.env(name="over-https", git=rm.GitRepo(url, path="src"))
        assert env.git is not None and env.git.commit == sha
        _maps_from_the_checkout(env, cache, cluster)
    # git spoke the smart protocol to the server: refs, then a pack.
    assert any("/urls.git/info/refs?service=git-upload-pack -> 200" in r for r in server.requests), server.requests
    assert any(r.startswith("POST /urls.git/git-upload-pack") and r.endswith("200") for r in server.requests)
